"""Shared fixtures: tiny GLM configs and twin models (ours and PaddleNLP's) with the same weights, the tiny demo
GLM (random and briefly fine-tuned) and its export; and CI's rule that a skipped test fails the run."""
from __future__ import annotations

import logging
import os

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import GLMConfig
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM

from paddle_glm.models.glm import GLMForConditionalGeneration

SHARED_ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")
COG_MODEL = os.path.join(SHARED_ASSETS, "cog-pretrain.model")

paddle.set_device("cpu")


def _failed_in_ci(report):
    """With CI=true a skip is a failure that names its reason: the tests that skip without ../shared/assets,
    Python 3.10's FastDeploy environment or torch are the ones a green CI must have run (`make test` provides them
    all). Elsewhere `make test` lists the skips and their reasons (-rs)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _failed_in_ci((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _failed_in_ci((yield))  # a whole module skipped (`pytest.importorskip` at its top)


def tiny_config(**overrides) -> GLMConfig:
    values = dict(
        num_layers=2, vocab_size=96, hidden_size=32, num_attention_heads=4, max_sequence_length=64,
        embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0,
        output_predict=True, parallel_output=False,
    )
    values.update(overrides)
    return GLMConfig(**values)


@pytest.fixture
def twin_models():
    """(ours, PaddleNLP's) in eval mode, sharing one set of random weights."""
    paddle.seed(1234)
    reference = PaddleNLPGLM(tiny_config())
    # Spread the weights out so that logits differ clearly between tokens (ties would hide bugs).
    state = {k: paddle.to_tensor(v.numpy() * (4.0 if "embeddings" in k else 1.0)) for k, v in reference.state_dict().items()}
    reference.set_state_dict(state)
    ours = GLMForConditionalGeneration(tiny_config())
    ours.set_state_dict(state)
    ours.eval()
    reference.eval()
    return ours, reference


@pytest.fixture
def cog_tokenizer():
    if not os.path.isfile(COG_MODEL):
        pytest.skip(f"needs the real GLM sentencepiece model at {COG_MODEL} (../shared/assets)")
    from paddle_glm.models.glm import tokenizer_from_sentencepiece

    return tokenizer_from_sentencepiece(COG_MODEL)


def to_numpy(tensor) -> np.ndarray:
    return tensor.astype("float32").numpy()


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory):
    """A tiny random GLM with a sentencepiece vocabulary trained on generated QG and BELLE data."""
    from paddle_glm.demo import build_demo_model
    from paddle_glm.demo_data import write_demo_splits

    root = tmp_path_factory.mktemp("demo")
    qg = write_demo_splits(str(root / "qg"), "qg", train=48, dev=6, seed=1)
    belle = write_demo_splits(str(root / "belle"), "belle", train=48, dev=8, seed=1)
    with open(qg["train"], "a", encoding="utf-8") as handle, open(belle["train"], encoding="utf-8") as extra:
        handle.write(extra.read())  # one vocabulary for both tasks
    build_demo_model(str(root / "base"), qg["train"], seed=0)
    return {"model": str(root / "base"), "qg": qg, "belle": belle, "root": root}


@pytest.fixture(scope="session")
def demo_trained(demo_base, tmp_path_factory) -> str:
    """The demo GLM fine-tuned a little (40 steps on its QG data): unlike the random one it ends its answers, so
    that length and penalty flags change what is generated. Which flags bind on the three test texts depends on the
    draw (seed 3 stopped doing so when dropout masks came from `paddle_glm.dropout`; seed 5 does)."""
    from paddle_glm.finetune import main as finetune

    output = tmp_path_factory.mktemp("trained")
    flags = dict(model_name_or_path=demo_base["model"], train_file=demo_base["qg"]["train"], max_train_samples=48,
                 output_dir=output, src_length=48, tgt_length=12, min_tgt_length=0, max_steps=40, learning_rate=5e-3,
                 per_device_train_batch_size=8, do_train=True, save_strategy="no", report_to="none", device="cpu",
                 seed=5, disable_tqdm=True)
    finetune([part for name, value in flags.items() for part in (f"--{name}", str(value))])
    return str(output)


@pytest.fixture(scope="session")
def decoded(demo_trained):
    """(texts, src_length, DecodingConfig fields) -> per text the responses that `generate` gives `demo_trained`
    with exactly those settings, its prompts built as prediction and evaluation build them: the reference for
    tests that flags reach decoding."""
    from paddle_glm.decoding import DecodingConfig
    from paddle_glm.generation import generate
    from paddle_glm.models import load_template

    template = load_template(demo_trained)
    model = GLMForConditionalGeneration.from_pretrained(demo_trained)
    model.eval()

    def responses(texts, src_length=48, **fields):
        config = DecodingConfig(eos_token_id=template.stop_ids, pad_token_id=template.pad_id,
                                tokenizer_size=template.tokenizer_size, **fields)
        prompts = [template.generation_example(template.prompt_ids(text, (), src_length)[0]) for text in texts]
        sequences = generate(model, prompts, config).sequences
        per_text = config.num_return_sequences
        return [[template.response(s) for s in sequences[i * per_text:(i + 1) * per_text]] for i in range(len(texts))]

    return responses


@pytest.fixture(scope="session")
def exported(demo_base, tmp_path_factory):
    """The tiny demo model (with a random LoRA adapter given an effect) exported in fp32."""
    from paddlenlp.peft import LoRAConfig, LoRAModel

    from export.exporter import main as export_main

    root = tmp_path_factory.mktemp("export")
    model = GLMForConditionalGeneration.from_pretrained(demo_base["model"])
    lora_model = LoRAModel(model, LoRAConfig(target_modules=[".*dense_h_to_4h.*"], r=4, lora_alpha=8))
    paddle.seed(9)
    for name, param in lora_model.model.named_parameters():
        if "lora_B" in name:
            param.set_value(paddle.randn(param.shape) * 0.3)
    lora_model.save_pretrained(str(root / "adapter"))
    export_main(["--model_name_or_path", demo_base["model"], "--lora_path", str(root / "adapter"),
                 "--output_path", str(root / "export"), "--tgt_length", "12", "--onnx"])
    return {"dir": str(root / "export"), "adapter": str(root / "adapter"), "base": demo_base["model"]}


@pytest.fixture
def paddlenlp_log(caplog):
    """PaddleNLP's logger and ours (`paddle_glm.logs`) do not propagate to the root logger: hook caplog onto both."""
    from paddlenlp.utils.log import logger as paddlenlp_logger

    from paddle_glm.logs import logger as our_logger

    loggers = (paddlenlp_logger.logger, our_logger)
    for logger in loggers:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)
