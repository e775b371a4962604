"""Structured output: grammars from API fields, compiled once and cached (xgrammar),
token masks applied batched to the constrained rows of each step, and tool calling
(prompt format, grammar and parser of tool calls).

    spec.py      API fields (response_format, grammar, structured_outputs) -> GrammarSpec
    compiler.py  GrammarSpec -> compiled grammar: off the event loop, bounded, cached by hash
    masks.py     the runner's per-step bitmask over the constrained rows, next mask overlapped
    tools.py     tools / tool_choice: prompt rendering, the tool-call grammar, the parser
"""
