#!/usr/bin/env python
"""Goldens for `prolora evaluate`, produced by the reference evaluation code itself.

The reference is the `eval/` folder of the PRoLoRA authors' repository (open-instruct's at commit
65c6f406 with their MMLU answer cue), or open-instruct's own at 65c6f406 (see
scripts/reference/README.md, "Evaluation goldens"). This script does not re-implement any
benchmark: it imports the reference's `eval.<benchmark>.run_eval` modules, builds each one's own
argparse parser (`_parser_of`), runs their `main(args)` with the paper's flags (chat format, slow tokenizer, shots, token limits), and only wraps the
reference's own `load_hf_lm_and_tokenizer` / `generate_completions` / `get_next_word_predictions`
to (a) load the tiny test model in float32, (b) force greedy decoding for HumanEval, (c) record the
exact prompts, token ids, logits and outputs. Predictions, gold answers, per-example correctness and
metrics are read back from the files the reference writes (predictions jsonl/csv, metrics.json).

Things that cannot run here and are replaced (documented in the README):
  * `vllm` (GPU only; the paper used it for GSM/BBH/TyDi/HumanEval) -> a stub, the HF path is used;
  * `evaluate.load("exact_match" | "squad")` downloads Hub scripts -> an offline module below whose
    `_compute` bodies are those scripts' code (late-2023 versions);
  * `--load_in_8bit` (bitsandbytes, CUDA) -> off; the model runs in float32.

Usage (from the repo root):
  python scripts/reference/make_eval_goldens.py --reference /path/to/checkout
         --sp-model LLAMA2/tokenizer.model [--model tests/fixtures/peft-lora/base]
         [--data-dir data/eval] [--out tests/fixtures/eval] [--only mmlu gsm ...]
         [--label TEXT] [--suffix=-open-instruct]
`--reference` is a directory containing the reference `eval/` package (a checkout of the authors'
repo, or of open-instruct at 65c6f406). Runs on CPU in about a minute.
"""
import argparse
import contextlib
import glob as _glob
import gzip
import io
import json
import os
import re
import shutil
import string
import sys
import tempfile
import types
from collections import Counter

BENCHMARKS = ["mmlu", "gsm", "bbh", "tydiqa", "codex_humaneval"]


# --------------------------------------------------------------------------------------------
# Offline stand-ins for modules the reference imports
# --------------------------------------------------------------------------------------------

def _install_vllm_stub():
    vllm = types.ModuleType("vllm")

    class _Unavailable:
        def __init__(self, *a, **k):
            raise RuntimeError("vllm is not available here; the goldens use the reference's HF path")

    vllm.LLM = _Unavailable
    vllm.SamplingParams = _Unavailable
    sys.modules["vllm"] = vllm


def _install_evaluate_offline():
    """`evaluate.load(name)` for the two Hub metrics the reference uses. The bodies are the Hub
    scripts' code (evaluate-metric/exact_match `_compute` as of 2023, evaluate-metric/squad with the
    official SQuAD v1.1 `compute_score`)."""
    import numpy as np

    class ExactMatch:
        def compute(self, predictions, references, regexes_to_ignore=None, ignore_case=False,
                    ignore_punctuation=False, ignore_numbers=False):
            # `datasets` casts both columns to Value("string")
            predictions = [str(x) for x in predictions]
            references = [str(x) for x in references]
            if regexes_to_ignore is not None:
                for s in regexes_to_ignore:
                    predictions = np.array([re.sub(s, "", x) for x in predictions])
                    references = np.array([re.sub(s, "", x) for x in references])
            else:
                predictions = np.asarray(predictions)
                references = np.asarray(references)
            if ignore_case:
                predictions = np.char.lower(predictions)
                references = np.char.lower(references)
            if ignore_punctuation:
                repl_table = string.punctuation.maketrans("", "", string.punctuation)
                predictions = np.char.translate(predictions, table=repl_table)
                references = np.char.translate(references, table=repl_table)
            if ignore_numbers:
                repl_table = string.digits.maketrans("", "", string.digits)
                predictions = np.char.translate(predictions, table=repl_table)
                references = np.char.translate(references, table=repl_table)
            score_list = predictions == references
            return {"exact_match": np.mean(score_list)}

    def normalize_answer(s):
        """Lower text and remove punctuation, articles and extra whitespace."""

        def remove_articles(text):
            return re.sub(r"\b(a|an|the)\b", " ", text)

        def white_space_fix(text):
            return " ".join(text.split())

        def remove_punc(text):
            exclude = set(string.punctuation)
            return "".join(ch for ch in text if ch not in exclude)

        def lower(text):
            return text.lower()

        return white_space_fix(remove_articles(remove_punc(lower(s))))

    def f1_score(prediction, ground_truth):
        prediction_tokens = normalize_answer(prediction).split()
        ground_truth_tokens = normalize_answer(ground_truth).split()
        common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
        num_same = sum(common.values())
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(prediction_tokens)
        recall = 1.0 * num_same / len(ground_truth_tokens)
        f1 = (2 * precision * recall) / (precision + recall)
        return f1

    def exact_match_score(prediction, ground_truth):
        return normalize_answer(prediction) == normalize_answer(ground_truth)

    def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
        scores_for_ground_truths = []
        for ground_truth in ground_truths:
            score = metric_fn(prediction, ground_truth)
            scores_for_ground_truths.append(score)
        return max(scores_for_ground_truths)

    def compute_score(dataset, predictions):
        f1 = exact_match = total = 0
        for article in dataset:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    total += 1
                    if qa["id"] not in predictions:
                        message = "Unanswered question " + qa["id"] + " will receive score 0."
                        print(message, file=sys.stderr)
                        continue
                    ground_truths = list(map(lambda x: x["text"], qa["answers"]))
                    prediction = predictions[qa["id"]]
                    exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
                    f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
        exact_match = 100.0 * exact_match / total
        f1 = 100.0 * f1 / total
        return {"exact_match": exact_match, "f1": f1}

    class Squad:
        def compute(self, predictions, references):
            # `datasets` encodes Sequence({"text", "answer_start"}) lists of dicts as a dict of lists
            def as_dict(a):
                return a if isinstance(a, dict) else {"text": [x["text"] for x in a],
                                                      "answer_start": [x.get("answer_start") for x in a]}
            references = [{"id": r["id"], "answers": as_dict(r["answers"])} for r in references]
            pred_dict = {prediction["id"]: prediction["prediction_text"] for prediction in predictions}
            dataset = [{"paragraphs": [{"qas": [
                {"answers": [{"text": answer_text} for answer_text in ref["answers"]["text"]], "id": ref["id"]}
                for ref in references]}]}]
            return compute_score(dataset=dataset, predictions=pred_dict)

    mod = types.ModuleType("evaluate")

    def load(name, *a, **k):
        if name == "exact_match":
            return ExactMatch()
        if name == "squad":
            return Squad()
        raise ValueError(f"metric {name!r} is not available offline")

    mod.load = load
    mod.squad_functions = dict(normalize_answer=normalize_answer, f1_score=f1_score,
                               exact_match_score=exact_match_score,
                               metric_max_over_ground_truths=metric_max_over_ground_truths)
    sys.modules["evaluate"] = mod
    return mod


# --------------------------------------------------------------------------------------------
# Recording wrappers around the reference's own helpers
# --------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.calls = []      # one list of per-prompt records per wrapped call
        self.model = None
        self.tokenizer = None


REC = Recorder()


def _wrap_loader(orig):
    def load_hf_lm_and_tokenizer(*args, **kwargs):
        kwargs["load_in_8bit"] = False           # bitsandbytes/CUDA only; the goldens run in f32
        model, tokenizer = orig(*args, **kwargs)
        model = model.float()                    # the fixture is f16; exact upcast
        REC.model, REC.tokenizer = model, tokenizer
        return model, tokenizer
    return load_hf_lm_and_tokenizer


def _wrap_generate(orig, force_greedy=False):
    import torch
    from eval.utils import KeyWordsCriteria

    def generate_completions(model, tokenizer, prompts, batch_size=1, stop_id_sequences=None, **kwargs):
        if force_greedy:  # HumanEval samples (do_sample=True, T, top_p); sampling RNGs cannot match
            kwargs["do_sample"] = False
            kwargs.pop("top_p", None)
            kwargs.pop("temperature", None)
        outputs = orig(model, tokenizer, prompts, batch_size=batch_size, stop_id_sequences=stop_id_sequences, **kwargs)
        records = []
        for prompt, output in zip(prompts, outputs):
            ids = tokenizer(prompt, add_special_tokens=True).input_ids  # = what the batch-1 call fed
            gen_kwargs = {k: v for k, v in kwargs.items() if k != "num_return_sequences"}
            with torch.no_grad():
                out = model.generate(
                    input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    stopping_criteria=[KeyWordsCriteria(stop_id_sequences)] if stop_id_sequences else None,
                    **gen_kwargs)
            records.append({"prompt": prompt, "prompt_ids": ids, "output": output,
                            "generated_ids": out[0, len(ids):].tolist(),
                            "stop_id_sequences": stop_id_sequences,
                            "generation_kwargs": {k: v for k, v in kwargs.items()}})
        REC.calls.append(records)
        return outputs
    return generate_completions


def _wrap_next_word(orig):
    import torch

    def get_next_word_predictions(model, tokenizer, prompts, candidate_token_ids=None, **kwargs):
        preds, probs = orig(model, tokenizer, prompts, candidate_token_ids=candidate_token_ids, **kwargs)
        records = []
        for prompt, pred, prob in zip(prompts, preds, probs):
            ids = tokenizer(prompt, add_special_tokens=True).input_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            records.append({"prompt": prompt, "prompt_ids": ids, "candidate_token_ids": list(candidate_token_ids),
                            "answer_logits": [float(logits[i]) for i in candidate_token_ids],
                            "answer_probs": [float(p) for p in prob], "pred_index": int(pred),
                            "argmax_token_over_vocab": int(torch.argmax(logits))})
        REC.calls.append(records)
        return preds, probs
    return get_next_word_predictions


def _parser_of(module):
    """The reference's own argparse parser. Its scripts build it inside `if __name__ == "__main__":`
    (no function to call), so the statements of that block up to `parser.parse_args()` are run."""
    import argparse
    import ast
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            body = []
            for stmt in node.body:
                if "parse_args" in ast.unparse(stmt):
                    break
                body.append(stmt)
            ns = {"argparse": argparse}
            exec(compile(ast.Module(body=body, type_ignores=[]), module.__file__, "exec"), ns)
            return ns["parser"]
    raise RuntimeError(f"{module.__file__}: no parser in its __main__ block")


def _patch(module, **wrappers):
    for name, wrap in wrappers.items():
        setattr(module, name, wrap(getattr(module, name)))


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------

COMMON = ["--use_slow_tokenizer", "--use_chat_format",
          "--chat_formatting_function", "eval.templates.create_prompt_with_tulu_chat_format",
          "--eval_batch_size", "1"]


def run_mmlu(ctx):
    import pandas as pd
    import eval.mmlu.run_eval as m
    _patch(m, load_hf_lm_and_tokenizer=_wrap_loader, get_next_word_predictions=_wrap_next_word)
    data_dir = os.path.join(ctx.data_dir, "mmlu")
    subjects = sorted(f.split("_test.csv")[0] for f in os.listdir(os.path.join(data_dir, "test")) if "_test.csv" in f)
    # The reference's metrics.json code takes np.mean(np.concatenate([])) for every subcategory /
    # category with no evaluated subject, which raises on a subset of MMLU. Restrict its tables to
    # the evaluated subjects (values for the others are undefined anyway).
    full_sub, full_cat = dict(m.subcategories), dict(m.categories)
    m.subcategories = {s: full_sub[s] for s in subjects}
    present = {c for s in subjects for c in full_sub[s]}
    m.categories = {k: v for k, v in full_cat.items() if any(c in present for c in v)}
    save = os.path.join(ctx.tmp, "mmlu")
    args = _parser_of(m).parse_args(["--ntrain", "0", "--data_dir", data_dir, "--save_dir", save,
                                        "--model_name_or_path", ctx.model_dir, "--tokenizer_name_or_path", ctx.model_dir,
                                        *COMMON])
    REC.calls.clear()
    m.main(args)
    records = [r for call in REC.calls for r in call]
    examples = []
    it = iter(records)
    for subject in subjects:
        out_csv = pd.read_csv(os.path.join(save, f"{subject}.csv"))
        test_df = pd.read_csv(os.path.join(data_dir, "test", subject + "_test.csv"), header=None)
        for row in range(test_df.shape[0]):
            r = next(it)
            examples.append({
                "id": f"{subject}/{row}", "subject": subject, "prompt": r["prompt"], "prompt_ids": r["prompt_ids"],
                "output": "", "answer_logits": r["answer_logits"], "answer_probs": r["answer_probs"],
                "prediction": m.choices[r["pred_index"]], "gold": test_df.iloc[row, -1],
                "correct": bool(out_csv["correct"].iloc[row]),
                "argmax_token_over_vocab": r["argmax_token_over_vocab"],
            })
    metrics = json.load(open(os.path.join(save, "metrics.json")))
    return {
        "settings": {"ntrain": 0, "use_chat_format": True,
                     "answer_prefix": records[0]["prompt"].rsplit("<|assistant|>\n", 1)[1],
                     "answer_choice_ids": records[0]["candidate_token_ids"], "batch_size": 1},
        "categories": {"subcategories": full_sub, "categories": full_cat},
        "metrics": metrics,
        "metrics_note": "metrics.json as the reference writes it, with subcat_acc/cat_acc restricted to the "
                        "subcategories/categories of the evaluated subjects (the reference raises on empty ones)",
        "examples": examples,
    }


def run_gsm(ctx, data_dir=None, fake_outputs=None):
    import eval.gsm.run_eval as m
    ev = sys.modules["evaluate"].load("exact_match")
    if fake_outputs is None:
        _patch(m, load_hf_lm_and_tokenizer=_wrap_loader, generate_completions=lambda f: _wrap_generate(f))
    else:
        m.load_hf_lm_and_tokenizer = lambda **kw: (None, REC.tokenizer)
        m.generate_completions = lambda model, tokenizer, prompts, **kw: list(fake_outputs)
    m.GSM_EXAMPLARS = __import__("eval.gsm.examplars", fromlist=["EXAMPLARS"]).EXAMPLARS
    save = os.path.join(ctx.tmp, "gsm" if fake_outputs is None else "gsm_strings")
    args = _parser_of(m).parse_args(["--n_shot", "8", "--data_dir", data_dir or os.path.join(ctx.data_dir, "gsm"),
                                        "--save_dir", save, "--model_name_or_path", ctx.model_dir,
                                        "--tokenizer_name_or_path", ctx.model_dir, *COMMON])
    REC.calls.clear()
    m.main(args)
    preds = _jsonl(os.path.join(save, "predictions.jsonl"))
    metrics = json.load(open(os.path.join(save, "metrics.json")))
    if fake_outputs is not None:
        return preds, metrics
    records = REC.calls[0]
    examples = []
    for i, (p, r) in enumerate(zip(preds, records)):
        examples.append({"id": i, "prompt": r["prompt"], "prompt_ids": r["prompt_ids"], "output": p["model_output"],
                         "generated_ids": r["generated_ids"], "prediction": p["prediction"], "gold": p["answer"],
                         "correct": bool(ev.compute(predictions=[p["prediction"]], references=[p["answer"]],
                                                    ignore_case=True, ignore_punctuation=True)["exact_match"])})
    ex = __import__("eval.gsm.examplars", fromlist=["EXAMPLARS"]).EXAMPLARS
    return {"settings": {"n_shot": 8, "use_chat_format": True, "max_new_tokens": 512, "stop_id_sequences": None,
                         "do_sample": False, "batch_size": 1},
            "exemplars": ex, "metrics": metrics, "examples": examples}


def run_bbh(ctx, data_dir=None, fake_outputs=None):
    import eval.bbh.run_eval as m
    ev = sys.modules["evaluate"].load("exact_match")
    m.glob = types.SimpleNamespace(glob=lambda p: sorted(_glob.glob(p)))  # deterministic task order
    if fake_outputs is None:
        _patch(m, load_hf_lm_and_tokenizer=_wrap_loader, generate_completions=lambda f: _wrap_generate(f))
    else:
        m.load_hf_lm_and_tokenizer = lambda **kw: (None, REC.tokenizer)
        m.generate_completions = lambda model, tokenizer, prompts, **kw: list(fake_outputs)
    save = os.path.join(ctx.tmp, "bbh" if fake_outputs is None else "bbh_strings")
    args = _parser_of(m).parse_args(["--data_dir", data_dir or os.path.join(ctx.data_dir, "bbh"), "--save_dir", save,
                                        "--model_name_or_path", ctx.model_dir, "--tokenizer_name_or_path", ctx.model_dir,
                                        "--no_cot", *COMMON])
    REC.calls.clear()
    m.main(args)
    metrics = json.load(open(os.path.join(save, "metrics.json")))
    tasks = [k for k in metrics if k != "average_exact_match"]
    if fake_outputs is not None:
        return [p for t in tasks for p in _jsonl(os.path.join(save, "predictions", f"{t}.jsonl"))], metrics
    examples = []
    for t, records in zip(tasks, REC.calls):
        for i, (p, r) in enumerate(zip(_jsonl(os.path.join(save, "predictions", f"{t}.jsonl")), records)):
            examples.append({"id": f"{t}/{i}", "task": t, "prompt": r["prompt"], "prompt_ids": r["prompt_ids"],
                             "output": p["raw_output"], "generated_ids": r["generated_ids"],
                             "prediction": p["prediction"], "gold": p["target"],
                             "correct": bool(ev.compute(predictions=[p["prediction"]], references=[p["target"]],
                                                        ignore_case=True, ignore_punctuation=True)["exact_match"])})
    return {"settings": {"no_cot": True, "use_chat_format": True, "max_new_tokens": 512, "stop_id_sequences": None,
                         "batch_size": 1, "task_order": "sorted (the reference uses unsorted glob order)"},
            "metrics": metrics, "examples": examples}


def run_tydiqa(ctx):
    import eval.tydiqa.run_eval as m
    sq = sys.modules["evaluate"].squad_functions
    _patch(m, load_hf_lm_and_tokenizer=_wrap_loader, generate_completions=lambda f: _wrap_generate(f))
    # record the reference's language set order and its sampled exemplars
    chosen = {}
    orig_sample = m.random.sample

    class _R:
        def __getattr__(self, k):
            return getattr(__import__("random"), k)

        @staticmethod
        def sample(population, k):
            out = orig_sample(population, k)
            if out and isinstance(out[0], dict) and "lang" in out[0]:
                chosen[out[0]["lang"]] = [x["id"] for x in out]
            return out

    m.random = _R()
    data_dir = os.path.join(ctx.data_dir, "tydiqa")
    save = os.path.join(ctx.tmp, "tydiqa")
    args = _parser_of(m).parse_args(["--data_dir", data_dir, "--save_dir", save,
                                        "--model_name_or_path", ctx.model_dir, "--tokenizer_name_or_path", ctx.model_dir,
                                        *COMMON])
    REC.calls.clear()
    m.main(args)
    m.random = __import__("random")
    preds = _jsonl(os.path.join(save, "tydiaqa_predictions.jsonl"))
    metrics = json.load(open(os.path.join(save, "metrics.json")))
    original = {}
    for article in json.load(open(os.path.join(data_dir, "tydiqa-goldp-v1.1-dev.json")))["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                original[qa["id"]] = para["context"]
    examples = []
    for p, r in zip(preds, REC.calls[0]):
        golds = [a["text"] for a in p["answers"]]
        em = sq["metric_max_over_ground_truths"](sq["exact_match_score"], p["prediction_text"], golds)
        f1 = sq["metric_max_over_ground_truths"](sq["f1_score"], p["prediction_text"], golds)
        examples.append({"id": p["id"], "lang": p["lang"], "prompt": r["prompt"], "prompt_ids": r["prompt_ids"],
                         "output": r["output"], "generated_ids": r["generated_ids"], "prediction": p["prediction_text"],
                         "gold": golds, "correct": bool(em), "f1": f1,
                         "context_truncated": p["context"] != original[p["id"]]})
    return {"settings": {"n_shot": 1, "max_context_length": 512, "use_chat_format": True, "max_new_tokens": 50,
                         "stop_id_sequences": None, "batch_size": 1, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
                         "language_set_order": list(metrics.keys())[:-1]},
            "templates": {"with_context": m.encoding_templates_with_context,
                          "without_context": m.encoding_templates_without_context},
            "exemplars": chosen, "metrics": metrics, "examples": examples}


def run_codex(ctx):
    import eval.codex_humaneval.run_eval as m
    from eval.codex_humaneval.execution import check_correctness
    from eval.codex_humaneval.evaluation import estimate_pass_at_k
    from eval.codex_humaneval.data import read_problems
    _patch(m, load_hf_lm_and_tokenizer=_wrap_loader,
           generate_completions=lambda f: _wrap_generate(f, force_greedy=True))
    data_file = os.path.join(ctx.data_dir, "codex_humaneval", "HumanEval.jsonl.gz")
    save = os.path.join(ctx.tmp, "codex")
    args = _parser_of(m).parse_args(["--data_file", data_file, "--save_dir", save,
                                        "--model_name_or_path", ctx.model_dir, "--tokenizer_name_or_path", ctx.model_dir,
                                        "--eval_pass_at_ks", "1", "--unbiased_sampling_size_n", "1",
                                        "--temperature", "0.1", *COMMON])
    REC.calls.clear()
    m.main(args)
    results = _jsonl(os.path.join(save, "codex_eval_predictions.jsonl_results.jsonl"))
    metrics = json.load(open(os.path.join(save, "metrics.json")))
    examples = []
    for res, r in zip(results, REC.calls[0]):
        examples.append({"id": res["task_id"], "prompt": r["prompt"], "prompt_ids": r["prompt_ids"],
                         "output": r["output"], "generated_ids": r["generated_ids"], "prediction": res["completion"],
                         "gold": None, "correct": bool(res["passed"]), "result": res["result"]})
    problems = read_problems(data_file)
    hand = []
    special = [
        ("syntax_error", "    return (\n"),
        ("infinite_loop", "    while True:\n        pass\n"),
        ("raises", "    raise ValueError('nope')\n"),
        ("calls_exit", "    exit(0)\n"),
        ("reads_stdin", "    return input()\n"),
        ("uses_os_remove", "    import os\n    os.remove('x')\n"),
        ("prints_then_wrong", "    print('hello')\n    return None\n"),
    ]
    for i, (tid, prob) in enumerate(problems.items()):
        for kind, comp in [("canonical_solution", prob["canonical_solution"]), ("return_none", "    return None\n")] + \
                          (special if i == 0 else []):
            res = check_correctness(prob, comp, 3.0, 0)
            hand.append({"task_id": tid, "kind": kind, "completion": comp, "passed": res["passed"], "result": res["result"]})
    table = []
    for n in [1, 2, 3, 5, 10, 20]:
        for c in range(0, n + 1):
            for k in [1, 2, 5, 10, 20]:
                if k <= n:
                    table.append({"n": n, "c": c, "k": k, "pass_at_k": float(estimate_pass_at_k(n, [c], k)[0])})
    table.append({"n": [20, 20, 10], "c": [0, 3, 10], "k": 1,
                  "pass_at_k": float(estimate_pass_at_k(__import__("numpy").array([20, 20, 10]), [0, 3, 10], 1).mean()),
                  "note": "mean over three problems, as evaluate_functional_correctness reports"})
    return {"settings": {"use_chat_format": True, "max_new_tokens": 512, "decoding": "greedy (paper: sampling, n=20, T=0.1, top_p=0.95)",
                         "stop_sequences": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "timeout_s": 3.0, "batch_size": 1},
            "metrics": metrics, "examples": examples, "hand_written": hand, "pass_at_k_table": table}


# --------------------------------------------------------------------------------------------
# strings.json: tables of strings through the reference's extraction / normalisation code
# --------------------------------------------------------------------------------------------

GSM_CASES = [  # (model output, gold as written after "####")
    ("So the answer is 42.", "42"), ("The answer is 1,234.", "1,234"), ("The total is 1,234,567 dollars", "1234567"),
    ("It is -5 degrees.", "-5"), ("It is -5.5 degrees.", "-5.5"), ("The price is $9.25.", "9.25"),
    ("3.50", "3.5"), ("18.0", "18"), ("He has 5. Then 7.", "7"), ("No number here", "3"),
    ("1,2,3", "123"), ("answer: .5", "0.5"), ("x = 12\n\nQuestion: 7 apples", "12"), ("+8", "8"),
    ("٣ apples", "3"), ("Answer: 1e5", "100000"), ("12:30", "30"), ("3/4", "4"),
]
BBH_CASES = [  # (model output, target)
    ("So the answer is (A).", "(A)"), ("the answer is yes. Because...", "Yes"), ("The answer is True", "True"),
    ("Let's see. The answer is 3.5.", "3.5"), ("(B)", "(B)"), ("  valid  \n", "valid"),
    ("I think the answer is   (C)  .", "(C)"), ("the answer is apple banana.", "apple banana"),
    ("no period answer is (D)", "(D)"), ("|he answer is 12.", "12"), ("The answer is 05/01/2021.", "05/01/2021"),
    ("the answer is\n(A).", "(A)"), ("", "(A)"), ("False.", "False"),
]
EM_PAIRS = [("(A)", "(A)"), ("(a)", "(A)"), ("A", "(A)"), ("-5", "5"), ("3.5", "35"), ("a b", "ab"), (" a", "a"),
            ("a ", "a"), ("ÉTÉ", "été"), ("«oui»", "oui"), (".", ""), ("!!", "?"), ("", ""), ("İ", "i̇"), ("ß", "SS")]
SQUAD_CASES = [  # (prediction, gold answers)
    ("The Eiffel Tower", ["Eiffel Tower"]), ("an apple", ["apple", "the apple"]), ("Paris, France.", ["Paris"]),
    ("  lots   of   space ", ["lots of space"]), ("the the the", ["a"]), ("Theater", ["the ater"]),
    ("1,000", ["1000"]), ("東京", ["東京都"]), ("東京 都", ["東京都", "都"]), ("جامعة القاهرة", ["جامعة القاهرة،"]),
    ("Хельсинки", ["хельсинки"]), ("", ["x"]), ("x", [""]), ("New York New York", ["New York"]),
    ("a an the", ["the"]), ("Ångström", ["ångström"]), ("don't", ["dont"]), ("U.S.A.", ["USA"]),
]


def make_strings(ctx):
    ev = sys.modules["evaluate"]
    sq = ev.squad_functions
    em = ev.load("exact_match")
    # GSM: run the reference's main with these outputs as the "generations" and these golds as the data
    d = os.path.join(ctx.tmp, "gsm_strings_data")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "test.jsonl"), "w") as f:
        for i, (_, gold) in enumerate(GSM_CASES):
            f.write(json.dumps({"question": f"q{i}", "answer": f"work\n#### {gold}"}) + "\n")
    preds, gsm_metrics = run_gsm(ctx, data_dir=d, fake_outputs=[o for o, _ in GSM_CASES])
    gsm = [{"output": o, "gold_raw": g, "gold": p["answer"], "prediction": p["prediction"],
            "correct": bool(em.compute(predictions=[p["prediction"]], references=[p["answer"]], ignore_case=True,
                                       ignore_punctuation=True)["exact_match"])}
           for (o, g), p in zip(GSM_CASES, preds)]
    # BBH: one task whose targets are ours, outputs ours
    d = os.path.join(ctx.tmp, "bbh_strings_data")
    os.makedirs(os.path.join(d, "bbh"), exist_ok=True)
    os.makedirs(os.path.join(d, "cot-prompts"), exist_ok=True)
    json.dump({"examples": [{"input": f"i{i}", "target": t} for i, (_, t) in enumerate(BBH_CASES)]},
              open(os.path.join(d, "bbh", "t.json"), "w"))
    with open(os.path.join(d, "cot-prompts", "t.txt"), "w") as f:
        f.write("canary\n-----\nDescribe.\n\nQ: q1\nA: Let's think step by step.\nStep. So the answer is (A).\n\n"
                "Q: q2\nA: Let's think step by step.\nSo the answer is no.")
    bpreds, bbh_metrics = run_bbh(ctx, data_dir=d, fake_outputs=[o for o, _ in BBH_CASES])
    bbh = [{"output": o, "gold": t, "prediction": p["prediction"],
            "correct": bool(em.compute(predictions=[p["prediction"]], references=[t], ignore_case=True,
                                       ignore_punctuation=True)["exact_match"])}
           for (o, t), p in zip(BBH_CASES, bpreds)]
    # the --no_cot exemplar rewrite of that prompt file, as the reference built it
    import eval.bbh.run_eval  # noqa: F401  (prompt visible through the recorded predictions' prompts is not kept)
    exact = [{"prediction": p, "reference": r,
              "exact_match": float(em.compute(predictions=[p], references=[r], ignore_case=True, ignore_punctuation=True)["exact_match"])}
             for p, r in EM_PAIRS]
    squad = [{"prediction": p, "golds": g, "normalized_prediction": sq["normalize_answer"](p),
              "normalized_golds": [sq["normalize_answer"](x) for x in g],
              "exact_match": bool(sq["metric_max_over_ground_truths"](sq["exact_match_score"], p, g)),
              "f1": float(sq["metric_max_over_ground_truths"](sq["f1_score"], p, g))} for p, g in SQUAD_CASES]
    return {"gsm_extraction": {"cases": gsm, "metrics_json": gsm_metrics},
            "bbh_extraction": {"cases": bbh, "metrics_json": bbh_metrics},
            "exact_match": {"options": {"ignore_case": True, "ignore_punctuation": True}, "cases": exact},
            "squad": {"cases": squad}}


# --------------------------------------------------------------------------------------------

def _dump(obj, path):
    text = json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False)
    # keep lists of numbers on one line (structural newlines only: string contents never hold a raw LF)
    text = re.sub(r"\[\n\s*(-?[\d.eE+-]+(?:,\n\s*-?[\d.eE+-]+)*)\n\s*\]",
                  lambda mm: "[" + ",".join(x.strip() for x in mm.group(1).split(",")) + "]", text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _compare_fast(ctx, result):
    """Record where the fast tokenizer (tokenizer.json) would feed different ids than the slow one."""
    if not ctx.fast_tokenizer_file:
        return
    from transformers import LlamaTokenizerFast
    fast = LlamaTokenizerFast(tokenizer_file=ctx.fast_tokenizer_file)
    n = 0
    for ex in result["examples"]:
        ids = fast(ex["prompt"], add_special_tokens=True).input_ids
        if ids != ex["prompt_ids"]:
            ex["prompt_ids_fast_tokenizer"] = ids
            n += 1
    result["settings"]["examples_where_fast_tokenizer_ids_differ"] = n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="directory containing the reference eval/ package")
    ap.add_argument("--model", default="tests/fixtures/peft-lora/base")
    ap.add_argument("--sp-model", required=True,
                    help="LLaMA-2's SentencePiece tokenizer.model (the slow tokenizer the paper used), not in "
                         "this repository: `huggingface-cli download meta-llama/Llama-2-7b-hf tokenizer.model` "
                         "(a gated repo: accept its license on the Hub first)")
    ap.add_argument("--legacy", choices=["false", "true"], default="false",
                    help="LlamaTokenizer `legacy` flag written into tokenizer_config.json (Llama-2 repos: false)")
    ap.add_argument("--data-dir", default="data/eval")
    ap.add_argument("--out", default="tests/fixtures/eval")
    ap.add_argument("--only", nargs="*", choices=BENCHMARKS + ["strings"])
    ap.add_argument("--label", default="Forence1999/PRoLoRA eval/ (the authors' copy of open-instruct eval/ @65c6f406)",
                    help="what --reference is, recorded in each file's settings.reference")
    ap.add_argument("--suffix", default="", help="appended to each file name (e.g. -open-instruct)")
    a = ap.parse_args()

    if os.environ.get("PYTHONHASHSEED") != "0":  # no set order can leak into a golden
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)

    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)
    _install_vllm_stub()
    _install_evaluate_offline()
    sys.path.insert(0, os.path.abspath(a.reference))

    ctx = types.SimpleNamespace()
    ctx.tmp = tempfile.mkdtemp(prefix="eval-goldens-")
    ctx.data_dir = os.path.abspath(a.data_dir)
    ctx.model_dir = os.path.join(ctx.tmp, "model")
    os.makedirs(ctx.model_dir)
    for f in ["config.json", "generation_config.json", "model.safetensors"]:
        os.symlink(os.path.abspath(os.path.join(a.model, f)), os.path.join(ctx.model_dir, f))
    shutil.copy(a.sp_model, os.path.join(ctx.model_dir, "tokenizer.model"))
    json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": a.legacy == "true", "add_bos_token": True,
               "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "pad_token": None, "clean_up_tokenization_spaces": False, "padding_side": "right",
               "model_max_length": 1000000000000000019884624838656},
              open(os.path.join(ctx.model_dir, "tokenizer_config.json"), "w"))
    fast_file = os.path.join(a.model, "tokenizer.json")
    ctx.fast_tokenizer_file = fast_file if os.path.exists(fast_file) else None

    import transformers
    import pandas
    import numpy
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": __import__("tokenizers").__version__, "sentencepiece": __import__("sentencepiece").__version__,
                "pandas": pandas.__version__, "numpy": numpy.__version__}
    os.makedirs(a.out, exist_ok=True)
    only = a.only or (BENCHMARKS + ["strings"])
    common = {"reference": a.label, "model": a.model, "tokenizer": f"slow LlamaTokenizer (legacy={a.legacy})",
              "dtype": "float32", "versions": versions}
    runners = {"mmlu": run_mmlu, "gsm": run_gsm, "bbh": run_bbh, "tydiqa": run_tydiqa, "codex_humaneval": run_codex}
    for b in BENCHMARKS:
        if b in only:
            res = runners[b](ctx)
            res["settings"] = {**common, **res["settings"]}
            _compare_fast(ctx, res)
            _dump(res, os.path.join(a.out, f"{'humaneval' if b == 'codex_humaneval' else b}{a.suffix}.json"))
            print(f"wrote {b}")
    if "strings" in only:
        if REC.tokenizer is None:
            from transformers import AutoTokenizer
            REC.tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir, use_fast=False)
        s = make_strings(ctx)
        s["settings"] = common
        _dump(s, os.path.join(a.out, f"strings{a.suffix}.json"))
        print("wrote strings")
    shutil.rmtree(ctx.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
