"""`python -m paddle_glm.checkpoint merge|split`: offline tensor-parallel shards of every family, by its own rules."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from paddle_glm.checkpoint import main, split_checkpoint
from paddle_glm.models.chatglm import ChatGLMForCausalLM
from paddle_glm.models.chatglm2 import ChatGLMv2ForCausalLM
from paddle_glm.models.glm import GLMForConditionalGeneration

from conftest import tiny_config as glm_config
from test_chatglm import tiny_config as chatglm_config
from test_chatglm2 import tiny_config as chatglm2_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "glm": (GLMForConditionalGeneration, glm_config, 2),
    "chatglm": (ChatGLMForCausalLM, chatglm_config, 2),
    "chatglm2-groups-split": (ChatGLMv2ForCausalLM, chatglm2_config, 2),
    "chatglm2-groups-replicated": (ChatGLMv2ForCausalLM, lambda: chatglm2_config(multi_query_group_num=1), 2),
}


def _state(path):
    return paddle.load(os.path.join(path, "model_state.pdparams"), return_numpy=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_split_then_merge_gives_back_the_checkpoint_bit_for_bit(name, tmp_path):
    model_class, config, degree = MODELS[name]
    paddle.seed(3)
    model_class(config()).save_pretrained(str(tmp_path / "whole"))
    (tmp_path / "whole" / "tokenizer.model").write_bytes(b"not read, only copied")
    main(["split", str(tmp_path / "whole"), str(tmp_path / "shards"), "--tensor_parallel_degree", str(degree)])
    shards = sorted(f for f in os.listdir(tmp_path / "shards") if f.startswith("model_state.tp"))
    assert shards == [f"model_state.tp{rank:02d}.pdparams" for rank in range(degree)]
    main(["merge", str(tmp_path / "shards"), str(tmp_path / "merged")])
    whole, merged = _state(tmp_path / "whole"), _state(tmp_path / "merged")
    assert sorted(whole) == sorted(merged)
    for key in whole:
        assert np.array_equal(whole[key], merged[key]), key
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == b"not read, only copied"
    # The shards really are split (the rank's share of a column-parallel weight), not copies.
    shard = paddle.load(str(tmp_path / "shards" / shards[0]), return_numpy=True)
    assert sum(shard[key].size for key in shard) < sum(whole[key].size for key in whole)


def test_split_and_merge_as_commands_write_the_functions_shards_and_join_them_back(tmp_path, monkeypatch):
    """`python -m paddle_glm.checkpoint split|merge ...` (the module run as `-m` runs it, in this process): the
    shards of `split_checkpoint` itself, and a merge that gives the checkpoint back bit for bit."""
    import runpy

    paddle.seed(3)
    GLMForConditionalGeneration(glm_config()).save_pretrained(str(tmp_path / "whole"))
    split_checkpoint(str(tmp_path / "whole"), str(tmp_path / "by_function"), 2)

    def command(*argv):
        monkeypatch.setattr(sys, "argv", ["python -m paddle_glm.checkpoint", *argv])
        with pytest.warns(RuntimeWarning, match="found in sys.modules"):  # imported already by this test file
            runpy.run_module("paddle_glm.checkpoint", run_name="__main__")

    command("split", str(tmp_path / "whole"), str(tmp_path / "shards"), "--tensor_parallel_degree", "2")
    for rank in range(2):
        name = f"model_state.tp{rank:02d}.pdparams"
        by_command = paddle.load(str(tmp_path / "shards" / name), return_numpy=True)
        by_function = paddle.load(str(tmp_path / "by_function" / name), return_numpy=True)
        assert sorted(by_command) == sorted(by_function)
        assert all(np.array_equal(by_command[k], by_function[k]) for k in by_function), rank
    command("merge", str(tmp_path / "shards"), str(tmp_path / "merged"))
    whole, merged = _state(tmp_path / "whole"), _state(tmp_path / "merged")
    assert sorted(whole) == sorted(merged) and all(np.array_equal(whole[k], merged[k]) for k in whole)


def test_split_refuses_a_degree_the_model_cannot_take_as_a_command(tmp_path):
    paddle.seed(3)
    GLMForConditionalGeneration(glm_config()).save_pretrained(str(tmp_path / "whole"))
    done = subprocess.run([sys.executable, "-m", "paddle_glm.checkpoint", "split", str(tmp_path / "whole"),
                           str(tmp_path / "shards"), "--tensor_parallel_degree", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: --tensor_parallel_degree 3 does not divide the model's 4 attention heads")
