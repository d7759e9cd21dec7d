"""Structured output and tool calling, between the wire and the engine (no HTTP, no tensors).

- constraints.py: `response_format` and generate's `grammar` -> one engine `Constraint`;
- tools.py: `tools` + `tool_choice` -> a `ToolPlan` (its grammar, its finish reason);
- tool_prompt.py: the messages a chat template sees when tools are offered;
- tool_parser.py: generated text -> OpenAI `tool_calls`, whole or as streamed deltas.

Every refusal is a `StructuredRequestError` naming the request field (the HTTP layer answers 422).
"""

from __future__ import annotations


class StructuredRequestError(ValueError):
    """A structured-output request that cannot be served: `message` for the client, `field` named."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message = message
        self.field = field
