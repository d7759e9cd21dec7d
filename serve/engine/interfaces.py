"""What the engine needs from a model and a tokenizer, as typing Protocols.

Any transformers causal LM and tokenizer fit; so do the small fakes tests build. Only what the
engine really touches is listed, so the type checker shows at once what a new use would add.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class ModelOutput(Protocol):
    """A forward's result: logits [batch, positions kept, vocab]."""

    logits: torch.Tensor


class CausalLM(Protocol):
    """A transformers-style causal language model in eval mode."""

    config: Any  # a transformers PretrainedConfig: `get_text_config()` gives layers, heads, eos ids

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def get_output_embeddings(self) -> Any: ...  # its `out_features` (or `.weight.shape[0]`): the logits' width

    def set_attn_implementation(self, name: str) -> None: ...  # the paged attention (paged.py)

    def forward(self, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> ModelOutput: ...


class Tokenizer(Protocol):
    """A transformers tokenizer (fast ones also carry a `backend_tokenizer` for DecodeStream)."""

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    @property
    def all_special_ids(self) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


def eos_ids_of(model: CausalLM, tokenizer: Tokenizer) -> set[int]:
    """Every EOS id the generation config, the model config and the tokenizer know of."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.get_text_config()):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
