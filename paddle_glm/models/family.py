"""What the pipeline asks of a model family, answered once per family.

Decoding, the trainer, evaluation, prediction, the exporter, the runner and the server never branch on the
family: they ask its `Family` (the model class, tokenizer loading, cache geometry, tensor-parallel and LoRA
defaults) and its `Template`, bound to a tokenizer (how a query, its dialogue history and a target become token
ids, positions and masks; which tokens stop generation).

Every family builds examples in one shape, so batching, masks and decoding are written once (`inputs.py`,
`stepper.py`):
- `input_ids` [S]; `position_ids` [P, S] with P = `position_rows` (GLM and ChatGLM-6B: 2, position and block
  position; ChatGLM2/3: 1); `attention_mask` = sep, the length of the bidirectional prefix (keys before it are
  visible to every query, the rest is causal; 0 = plain causal);
- training examples add `labels` (the next token at each position) and `loss_mask` (1 on the target and its stop
  token only);
- generation examples are the prompt and the tokens that open an answer (`answer_start`: GLM's and ChatGLM-6B's
  `<sop>`), plus `position_step` [P]: what each generated token adds to the previous position (GLM,
  ChatGLM-6B: (0, 1), the block position counts; ChatGLM2/3: (1,)).
A prompt (`render`) never includes `answer_start`, so `--src_length` bounds what the reference's bounds.
"""
from __future__ import annotations

import contextlib

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Family", "Template", "History"]

History = Sequence[Tuple[str, str]]  # earlier (query, response) rounds of a dialogue, oldest first
Example = Dict[str, np.ndarray]


class Template:
    """A family's text -> model-input rules, bound to one tokenizer."""

    position_step: Tuple[int, ...] = (1,)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    # ---------------------------------------------------------------- what each family defines

    @property
    def stop_ids(self) -> Tuple[int, ...]:
        """Tokens that end an answer; the first one is the one training appends to targets."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def answer_start(self) -> Tuple[int, ...]:
        """Tokens between a prompt and its answer (GLM's `<|startofpiece|>`); none by default."""
        return ()

    def render(self, query: str, history: History) -> List[int]:
        """The prompt (specials, template, history) for `query`, without `answer_start`."""
        raise NotImplementedError

    def render_cut(self, query_ids: List[int], room: int) -> List[int]:
        """The prompt of a query cut to its first `room` ids, without history. By default the cut is decoded and
        rendered again (templates tokenize whole strings, as THUDM's code does)."""
        return self.render(self.decode(query_ids[:room]), [])

    def sep(self, prompt_ids: Sequence[int]) -> int:
        """Length of the bidirectional prefix of a prompt (0: causal throughout)."""
        return 0

    def positions(self, prompt_ids: Sequence[int], length: int) -> np.ndarray:
        """Position ids [P, length] of the prompt followed by `length - len(prompt_ids)` answer tokens."""
        return np.arange(length, dtype="int64")[None]

    def target_ids(self, response: str) -> List[int]:
        """The ids the model must generate for `response` (without the stop token)."""
        return self.encode(response)

    def response(self, ids: Sequence[int]) -> str:
        """The answer a reader sees for generated ids (THUDM's chat models post-process their output: ChatGLM3's
        answer opens with a metadata line). Predictions and the references they are scored against pass through it."""
        return self.decode(ids)

    def completion_prompt(self, text: str) -> List[int]:
        """The prompt for `text` to be continued as plain text, without a chat format (benchmark scoring of base
        models, `--chat_template off`): only the family's special tokens. Default: `render(text, [])`, which is that
        for families whose prompts without history have no chat wrapping (GLM, ChatGLM-6B)."""
        return self.render(text, [])

    # ---------------------------------------------------------------- shared by every family

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's `decode(ids, skip_special_tokens=True)`, the special ids dropped here first: PaddleNLP
        2.8.1 recomputes `all_special_ids` (a vocabulary lookup of every special token) for each id it decodes
        with skip_special_tokens, ~1 ms for 25 ids, the largest host cost of a streaming server's step."""
        special = set(self.tokenizer.all_special_ids)
        return self.tokenizer.decode([i for i in ids if int(i) not in special])

    @property
    def tokenizer_size(self) -> int:
        return len(self.tokenizer)

    def prompt_ids(self, query: str, history: History = (), max_length: Optional[int] = None) -> Tuple[List[int], bool]:
        """(`render` within `max_length` ids, whether anything was cut): the oldest rounds of the history go first,
        then the end of the query (prompts put the instruction or answer first)."""
        history = list(history)
        ids = self.render(query, history)
        if max_length is None or len(ids) <= max_length:
            return ids, False
        while history:
            history.pop(0)
            ids = self.render(query, history)
            if len(ids) <= max_length:
                return ids, True
        overhead = len(self.render("", []))
        if overhead >= max_length:
            raise ValueError(f"a source length of {max_length} tokens leaves no room for text: the template alone "
                             f"takes {overhead}; raise --src_length")
        query_ids = self.encode(query)
        for room in range(max_length - overhead, 0, -1):  # decoding a cut and encoding again can merge pieces
            ids = self.render_cut(query_ids, room)
            if len(ids) <= max_length:
                return ids, True
        return self.render("", []), True

    def training_example(self, prompt_ids: Sequence[int], target_ids: Sequence[int], max_target_length: int) -> Example:
        """The prompt followed by the target: labels and loss on the target's tokens and the stop token only.

        The target keeps its first `max_target_length - 1` ids (+ the stop token)."""
        target = list(target_ids)[: max_target_length - 1]
        prompt = list(prompt_ids)
        opened = prompt + list(self.answer_start)
        input_ids = opened + target
        first = len(opened) - 1  # this position predicts the first target token
        labels = [0] * first + target + [self.stop_ids[0]]
        return {
            "input_ids": np.array(input_ids, dtype="int64"),
            "position_ids": self.positions(prompt, len(input_ids)),
            "attention_mask": np.array(self.sep(prompt), dtype="int64"),
            "labels": np.array(labels, dtype="int64"),
            "loss_mask": np.array([0] * first + [1] * (len(target) + 1), dtype="float32"),
        }

    def generation_example(self, prompt_ids: Sequence[int]) -> Example:
        """The prompt and `answer_start`, ready for `inputs.generation_batch` and a `Stepper`."""
        prompt = list(prompt_ids)
        opened = prompt + list(self.answer_start)
        return {
            "input_ids": np.array(opened, dtype="int64"),
            "position_ids": self.positions(prompt, len(opened)),
            "attention_mask": np.array(self.sep(prompt), dtype="int64"),
            "position_step": np.array(self.position_step, dtype="int64"),
        }

    def special_ids(self) -> Dict[str, int]:
        """The special tokens the template uses, by name (recorded in an export's config)."""
        return {"pad": self.pad_id, "stop": list(self.stop_ids)}


class Family:
    """One model family: its model class, tokenizer, template, cache geometry and defaults."""

    name: str = ""
    model_types: Tuple[str, ...] = ()  # config.json model_type values this family reads (PaddleNLP's names)
    name_patterns: Tuple[str, ...] = ()  # what names of downloadable models contain (lower case, no - or _)
    tokenizer_classes: Tuple[str, ...] = ()  # tokenizer_config.json's tokenizer_class of this family's tokenizers
    lora_targets: Tuple[str, ...] = (".*query_key_value.*",)
    position_rows: int = 1
    # How `pretrain.py` trains it (`paddle_glm.blocklm`): "causal_lm" over packed text, or GLM's "blank_infilling".
    pretraining_objective: str = "causal_lm"

    @property
    def model_class(self):
        raise NotImplementedError

    @property
    def config_class(self):
        return self.model_class.config_class

    def claims(self, config: dict) -> bool:
        """Whether a config.json (as a dict) describes this family's architecture; an export's config names its
        family, a tokenizer's its class."""
        return (config.get("model_type") in self.model_types or config.get("family") == self.name
                or (config.get("tokenizer_class") in self.tokenizer_classes and "model_type" not in config))

    def load_tokenizer(self, name_or_path: str):
        raise NotImplementedError

    def template(self, tokenizer) -> Template:
        raise NotImplementedError

    # ---------------------------------------------------------------- geometry, from the config

    def num_layers(self, config) -> int:
        return int(config.num_hidden_layers)

    def kv_heads(self, config) -> int:
        """Heads the K/V cache holds (the K/V groups of multi-query attention)."""
        return int(config.num_attention_heads)

    def head_dim(self, config) -> int:
        return int(config.hidden_size) // int(config.num_attention_heads)

    def max_positions(self, config) -> int:
        return int(config.max_sequence_length)

    def tensor_parallel_problems(self, config, degree: int) -> List[str]:
        """Why `--tensor_parallel_degree degree` cannot split this model (empty: it can)."""
        heads, vocab = int(config.num_attention_heads), int(config.vocab_size)
        if heads % degree:
            divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
            return [f"--tensor_parallel_degree {degree} does not divide the model's {heads} attention heads: "
                    f"use one of {divisors}"]
        if vocab % degree:
            return [f"--tensor_parallel_degree {degree} does not divide the model's vocabulary of {vocab} embeddings"]
        return []

    @property
    def release(self):
        """Its published checkpoints' layout (`models.release.Release`), for `paddle_glm.convert`; None: the family
        converts only between our own layouts."""
        return None

    def prepare_export(self, model) -> None:
        """Adjust a model before tracing (e.g. ops that ONNX converters would change); nothing by default."""

    def paddle_graph_form(self, model) -> contextlib.AbstractContextManager:
        """A context in which the exporter traces `model`'s Paddle graph (after its ONNX one): forms Paddle
        Inference runs faster but ONNX Runtime's tools would not rewrite or quantize; none by default."""
        return contextlib.nullcontext()

    def prepare_lora(self, lora_model) -> None:
        """Adjust a model once its LoRA adapters are in place (e.g. gradient hooks of adapter columns that several
        tensor-parallel ranks hold alike); nothing by default."""
