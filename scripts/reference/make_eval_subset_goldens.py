#!/usr/bin/env python
"""Prompt goldens for the reference's seeded draws, produced by the reference evaluation code.

`prolora evaluate --max-examples N` replays the subsets that the reference's own flags draw after
`random.seed(42)` (GSM and HumanEval `--max_num_examples`, BBH `--max_num_examples_per_task`, TyDi QA
`--max_num_examples_per_lang`, MMLU `--n_instances` through pandas), and `--shots` replays the
exemplars they draw (TyDi QA's per-language `random.sample`, GSM's below 8, MMLU's first `--ntrain`
dev rows). This script runs the reference's `main(args)` with those flags and records, in order, the
prompts it builds: that is all these goldens hold.

Only prompt building runs. `load_hf_lm_and_tokenizer` returns the slow LLaMA-2 tokenizer (the one
the full goldens use) and no model; `generate_completions` returns empty outputs, MMLU's
`get_next_word_predictions` answers "A", HumanEval's `evaluate_functional_correctness` runs nothing.
Everything before the model call (reading, the seeded draws, truncation, chat formatting) is the
reference's own code. The offline stand-ins and the parser helper come from make_eval_goldens.py.

Usage (from the repo root; ~10 s):
  python scripts/reference/make_eval_subset_goldens.py --paper <Forence1999/PRoLoRA checkout> \
         --open-instruct <allenai/open-instruct checkout at 65c6f406>
Writes tests/fixtures/eval/subsets.json and the TyDi QA data it needs,
tests/fixtures/eval/tydiqa-shots/tydiqa/ (the sample dev file, and a train file holding the
sample train and dev questions so that every language has more than one to draw from).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_eval_goldens as g  # noqa: E402

COMMON = g.COMMON
TYDI_SHOTS_DIR = "tests/fixtures/eval/tydiqa-shots"


def _tokenizer(model_dir, sp_model):
    import shutil
    from transformers import AutoTokenizer
    os.makedirs(model_dir, exist_ok=True)
    shutil.copy(sp_model, os.path.join(model_dir, "tokenizer.model"))
    json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
               "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "pad_token": None, "clean_up_tokenization_spaces": False, "padding_side": "right"},
              open(os.path.join(model_dir, "tokenizer_config.json"), "w"))
    return AutoTokenizer.from_pretrained(model_dir, use_fast=False)


def _run(module, argv, tokenizer, save):
    """The reference's main on `argv`; the prompts it gave the model, in order."""
    seen = []

    def generate_completions(model=None, tokenizer=None, prompts=(), **kw):
        seen.extend(prompts)
        return [""] * len(prompts)

    def get_next_word_predictions(model=None, tokenizer=None, prompts=(), **kw):
        seen.extend(prompts)
        return [0] * len(prompts), [[0.25] * 4 for _ in prompts]

    module.load_hf_lm_and_tokenizer = lambda **kw: (None, tokenizer)
    module.generate_completions = generate_completions
    module.get_next_word_predictions = get_next_word_predictions
    module.evaluate_functional_correctness = lambda **kw: {}
    args = g._parser_of(module).parse_args(argv + ["--save_dir", save, "--model_name_or_path", "stub"] + COMMON)
    module.main(args)
    return seen


def _mmlu(module, data_dir, argv, tokenizer, save):
    # As make_eval_goldens.py: the metrics tables are restricted to the subjects present (the
    # reference raises on empty ones); prompts are unaffected.
    subjects = sorted(f.split("_test.csv")[0] for f in os.listdir(os.path.join(data_dir, "test")))
    module.subcategories = {s: module.subcategories[s] for s in subjects}
    present = {c for s in subjects for c in module.subcategories[s]}
    module.categories = {k: v for k, v in module.categories.items() if any(c in present for c in v)}
    return _run(module, ["--data_dir", data_dir] + argv, tokenizer, save)


def one(protocol, reference, data_dir, sp_model):
    """The cases of one reference checkout, as JSON on stdout."""
    g._install_vllm_stub()
    g._install_evaluate_offline()
    sys.path.insert(0, os.path.abspath(reference))
    tmp = tempfile.mkdtemp(prefix="eval-subsets-")
    tok = _tokenizer(os.path.join(tmp, "tokenizer"), sp_model)
    import eval.mmlu.run_eval as mmlu
    cases = {}
    mmlu_argv = ["--ntrain", "2", "--n_instances", "3"]
    cases[f"mmlu_{protocol}"] = {
        "flags": mmlu_argv,
        "prompts": _mmlu(mmlu, os.path.join(data_dir, "mmlu"), mmlu_argv, tok, os.path.join(tmp, "mmlu"))}
    if protocol == "paper":
        import eval.gsm.run_eval as gsm
        import eval.bbh.run_eval as bbh
        import eval.tydiqa.run_eval as tydiqa
        import eval.codex_humaneval.run_eval as codex
        bbh.glob = types.SimpleNamespace(glob=lambda p: sorted(__import__("glob").glob(p)))  # as ours: sorted tasks
        runs = {
            "gsm": (gsm, ["--data_dir", os.path.join(data_dir, "gsm"), "--max_num_examples", "5", "--n_shot", "3"]),
            "bbh": (bbh, ["--data_dir", os.path.join(data_dir, "bbh"), "--no_cot", "--max_num_examples_per_task", "3"]),
            "tydiqa": (tydiqa, ["--data_dir", os.path.join(data_dir, "tydiqa"), "--max_num_examples_per_lang", "1"]),
            "tydiqa_shots": (tydiqa, ["--data_dir", os.path.join(TYDI_SHOTS_DIR, "tydiqa"),
                                      "--max_num_examples_per_lang", "1", "--n_shot", "2"]),
            "humaneval": (codex, ["--data_file", os.path.join(data_dir, "codex_humaneval", "HumanEval.jsonl.gz"),
                                  "--max_num_examples", "3", "--unbiased_sampling_size_n", "1"]),
        }
        for name, (module, argv) in runs.items():
            cases[name] = {"flags": argv, "prompts": _run(module, argv, tok, os.path.join(tmp, name))}
    json.dump(cases, sys.stdout)


def _tydiqa_shots_data(data_dir):
    """The sample dev file, and a train file of the sample train and dev articles."""
    out = os.path.join(TYDI_SHOTS_DIR, "tydiqa")
    os.makedirs(out, exist_ok=True)
    src = os.path.join(data_dir, "tydiqa")
    dev = json.load(open(os.path.join(src, "tydiqa-goldp-v1.1-dev.json"), encoding="utf-8"))
    train = json.load(open(os.path.join(src, "tydiqa-goldp-v1.1-train.json"), encoding="utf-8"))
    train = {**train, "data": train["data"] + dev["data"]}
    for name, value in [("tydiqa-goldp-v1.1-dev.json", dev), ("tydiqa-goldp-v1.1-train.json", train)]:
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(value, f, ensure_ascii=False, indent=1)
            f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", help="the authors' checkout (Forence1999/PRoLoRA), holding eval/")
    ap.add_argument("--open-instruct", help="allenai/open-instruct at 65c6f406, holding eval/")
    ap.add_argument("--data-dir", default="data/eval")
    ap.add_argument("--sp-model", required=True,
                    help="LLaMA-2's SentencePiece tokenizer.model, as for make_eval_goldens.py")
    ap.add_argument("--out", default="tests/fixtures/eval/subsets.json")
    ap.add_argument("--one", nargs=2, metavar=("PROTOCOL", "REFERENCE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.one[0], a.one[1], a.data_dir, a.sp_model)
    _tydiqa_shots_data(a.data_dir)
    cases = {}
    # One process per checkout: both have a package named `eval`.
    for protocol, reference in [("paper", a.paper), ("open-instruct", a.open_instruct)]:
        out = subprocess.run([sys.executable, __file__, "--one", protocol, reference, "--data-dir", a.data_dir,
                              "--sp-model", a.sp_model], check=True, capture_output=True, text=True).stdout
        cases.update(json.loads(out.splitlines()[-1]))
    result = {"settings": {"reference": {"paper": "Forence1999/PRoLoRA eval/",
                                         "open-instruct": "allenai/open-instruct eval/ @65c6f406"},
                           "common_flags": COMMON, "bbh_task_order": "sorted (the reference uses glob order)",
                           "tokenizer": "slow LlamaTokenizer (legacy=false)"},
              "cases": cases}
    g._dump(result, a.out)
    print(f"wrote {a.out} and {TYDI_SHOTS_DIR}")


if __name__ == "__main__":
    main()
