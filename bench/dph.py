"""Direct Preference Heads against a separate reward model and DPO, on real human preferences.

All methods see the same HH-RLHF pairs (../shared/data/dfki_hh-rlhf_train_sample_1pct.jsonl:
each line holds a `chosen` and a `rejected` dialogue that share everything up to the last
"Assistant:" turn; that shared part is the prompt, the two last answers are the pair) and
the same base model, and are scored on the same held-out pairs. The split is by prompt:
pairs are grouped by their first human turn (bench.hh_rlhf.split_by_first_turn, i.e.
rlhf.heldout.split_by_prompt on it), so no opening question is on both sides. Each method's
held-out result is rlhf.heldout.pairwise_report of its margin score(chosen) - score(rejected):
accuracy with a 95% interval resampled over first turns, the number of held-out prompts,
the trivial baselines on the same pairs (longer / shorter answer wins, each story metric
alone, the keyword metric reading the first turn) and the verdict against the best of them.

- dph_head: the arena's default DPH job (rlhf.dph.fit_head, mode head): frozen LM
  features computed once, then head_steps steps of the head alone.
- dph_lora: DPH with the head and a LoRA adapter trained together (mode lora, no DPO term).
- reward_model: TRL RewardTrainer on the sequence-classification version of the same base,
  the same LoRA adapter (plus its score head), Bradley-Terry loss.
- dpo: TRL DPOTrainer (sigmoid loss, beta 0.1) with the same LoRA adapter; its margin is
  the implicit reward's (rlhf.dpo.implicit_reward_margins, as the dpo job reports it).

The LM-training methods run the same number of steps with the same batch size, learning
rate and adapter, one after the other in this process, so their seconds per step compare
as ratios (DPO pays a reference forward per step, DPH and the reward model do not);
absolute times depend on what else runs on the machine. Pairs longer than --max-length
tokens (prompt + longer answer, as the DPH head reads them) are skipped, so that no method
sees cut texts. Everything the libraries print goes to stderr; stdout holds one JSON object.

    python -m bench.dph        # SmolLM2-135M starter: about 1450 CPU-seconds (12 min on 2 free cores)
    python -m bench.dph --train-pairs 96 --eval-pairs 48        # about 10 min (estimated from CPU time)
    python -m bench.dph --model tiny --steps 3 --train-pairs 48 --eval-pairs 24 --head-steps 50   # 1 min

Most of the cost is forward passes: the head's features (one per story, about 1 CPU-second
each for the starter at 160 tokens) and the held-out scoring of each method (DPO's doubled
by its reference model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.hh_rlhf import read_pairs, report_records, split_by_first_turn

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dfki_hh-rlhf_train_sample_1pct.jsonl"
DPO_BETA = 0.1


class StepTimer:
    """Wall seconds of each training step; the steady cost is the median after the first
    (which includes warm-up)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self
        self.durations: list[float] = []

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.mark = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.durations.append(time.perf_counter() - timer.mark)

        self.callback = Callback()

    def seconds_per_step(self) -> float:
        return statistics.median(self.durations[1:] or self.durations)


def load_pairs(path: Path, tokenizer, max_length: int, n_train: int, n_eval: int, seed: int):
    """n_train training and n_eval held-out pairs that fit max_length tokens, split by first
    human turn (bench.hh_rlhf.split_by_first_turn), so no opening question is on both sides."""
    from rlhf.scoring import encode_pair

    pairs = []
    for pair in read_pairs(path):
        longest = max(len(encode_pair(tokenizer, pair["prompt"], pair[k], 1_000_000)[0])
                      for k in ("chosen", "rejected"))
        if longest <= max_length:
            pairs.append(pair)
    train, held_out = split_by_first_turn(pairs, n_eval / (n_train + n_eval))
    random.Random(seed).shuffle(train)
    random.Random(seed).shuffle(held_out)
    if len(train) < n_train or len(held_out) < n_eval:
        raise SystemExit(f"only {len(train)} training and {len(held_out)} held-out pairs fit {max_length} tokens; "
                         "ask for fewer or raise --max-length")
    return train[:n_train], held_out[:n_eval], len(pairs)


def base_model_dir(kind: str, work_dir: Path, texts: list[str]) -> Path:
    from rlhf.models import build_tiny_starter, prepare_starter

    models_dir = work_dir / "models"
    return prepare_starter(models_dir) if kind == "smollm2" else build_tiny_starter(models_dir, texts)


def run_dph(settings, args, source: str, mode: str, train: list[dict], held_out: list[dict]) -> dict:
    from rlhf.dph import DPHParams, fit_head, head_margins
    from rlhf.progress import JobProgress
    from rlhf.training import load_trainable_lm

    steps = args.head_steps if mode == "head" else args.steps
    p = DPHParams.from_dict({  # explicit steps: the job would otherwise size them by the data
        "base": 1, "mode": mode, "max_steps": steps,
        "batch_size": args.head_batch_size if mode == "head" else args.batch_size,
        "learning_rate": args.head_learning_rate, "lm_learning_rate": args.lm_learning_rate,
        "max_length": args.max_length, "lora_r": args.lora_r})
    lm, tokenizer = load_trainable_lm(source, None)
    timer = StepTimer()
    fitted = fit_head(settings, p, lm, tokenizer, train, held_out, args.max_length, source,
                      settings.models_dir / f"dph-{mode}", JobProgress(settings, None), [timer.callback])
    started = time.perf_counter()
    margins = head_margins(fitted.head, fitted.features, held_out)
    result = {"margins": margins, "steps": fitted.metrics["steps"],
              "seconds_per_step": timer.seconds_per_step(), "eval_seconds": time.perf_counter() - started}
    if mode == "head":
        result["feature_seconds_per_pair"] = fitted.metrics["feature_seconds"] / (len(train) + len(held_out))
    return result


def lora_for(model, r: int, task_type: str):
    from peft import LoraConfig

    from rlhf.training import lora_config

    causal = lora_config(model, r)
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=causal.target_modules,
                      fan_in_fan_out=causal.fan_in_fan_out, bias="none", task_type=task_type)


def run_reward_model(settings, args, source: str, train: list[dict], held_out: list[dict]) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from rlhf.reward import held_out_margins
    from rlhf.scoring import encode, make_scorer
    from rlhf.training import trainer_device_args

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    meta = {"backbone": "policy", "max_length": args.max_length + 8}  # whole-text tokens may differ by a few
    prompts = [r["prompt"] for r in train]
    data = Dataset.from_dict({"chosen_ids": encode(tokenizer, meta, prompts, [r["chosen"] for r in train]),
                              "rejected_ids": encode(tokenizer, meta, prompts, [r["rejected"] for r in train])})
    config = RewardConfig(
        output_dir=str(settings.models_dir / "reward"), **{**trainer_device_args(settings), "save_strategy": "no"},
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lm_learning_rate,
        max_length=None, seed=0,
    )
    timer = StepTimer()
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                            peft_config=lora_for(model, args.lora_r, "SEQ_CLS"), callbacks=[timer.callback])
    trainer.train()
    started = time.perf_counter()
    scorer = make_scorer(trainer.model.eval(), tokenizer, meta, trainer.model.device)
    return {"margins": held_out_margins(scorer, held_out), "steps": trainer.state.global_step,
            "seconds_per_step": timer.seconds_per_step(), "eval_seconds": time.perf_counter() - started}


def run_dpo(settings, args, source: str, train: list[dict], held_out: list[dict]) -> dict:
    from trl import DPOConfig, DPOTrainer

    from rlhf.dpo import implicit_reward_margins
    from rlhf.training import load_trainable_lm, preference_dataset, trainer_device_args

    model, tokenizer = load_trainable_lm(source, None)
    config = DPOConfig(
        output_dir=str(settings.models_dir / "dpo"), **{**trainer_device_args(settings), "save_strategy": "no"},
        max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lm_learning_rate, beta=DPO_BETA, loss_type=["sigmoid"], max_length=args.max_length + 8,
        precompute_ref_log_probs=False, seed=0,
    )
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=config, train_dataset=preference_dataset(train, tokenizer),
                         processing_class=tokenizer,
                         peft_config=lora_for(model, args.lora_r, "CAUSAL_LM"), callbacks=[timer.callback])
    trainer.train()
    started = time.perf_counter()
    margins = implicit_reward_margins(trainer.model, None, tokenizer, held_out, DPO_BETA, args.max_length + 8,
                                      args.batch_size)
    return {"margins": margins, "steps": trainer.state.global_step,
            "seconds_per_step": timer.seconds_per_step(), "eval_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.dph", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF style JSON lines (chosen, rejected)")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                        help="the packaged SmolLM2-135M starter (converted once) or a tiny random GPT-2")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/story-arena-bench-dph"),
                        help="where the converted model and trainer outputs go")
    parser.add_argument("--train-pairs", type=int, default=128)
    parser.add_argument("--eval-pairs", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=160, help="tokens of prompt + answer (longer pairs skipped)")
    parser.add_argument("--steps", type=int, default=4, help="steps of each LM-training method")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step of the LM-training methods")
    parser.add_argument("--head-steps", type=int, default=300, help="steps of the head on frozen features")
    parser.add_argument("--head-batch-size", type=int, default=16)
    parser.add_argument("--head-learning-rate", type=float, default=1e-3)
    parser.add_argument("--lm-learning-rate", type=float, default=1e-4, help="LoRA learning rate for every method")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--methods", default="dph_head,dph_lora,reward_model,dpo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="CI size: tiny random GPT-2, 32/16 pairs, 2 LM steps, 50 head steps "
                             "(checks it runs; the accuracies mean nothing)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.train_pairs, args.eval_pairs, args.steps, args.head_steps = "tiny", 32, 16, 2, 50

    from transformers import AutoTokenizer, set_seed

    from rlhf.heldout import pairwise_report
    from rlhf.models import resolve_device
    from rlhf.settings import Settings

    started = time.perf_counter()
    set_seed(args.seed)
    settings = Settings(data_dir=args.work_dir.resolve(), device="cpu" if args.model == "tiny" else "auto")
    texts = [json.loads(line)["chosen"] for line in args.data.read_text(encoding="utf-8").splitlines()[:400]]
    source = str(base_model_dir(args.model, settings.data_dir, texts))
    tokenizer = AutoTokenizer.from_pretrained(source)
    train, held_out, fitting = load_pairs(args.data, tokenizer, args.max_length, args.train_pairs, args.eval_pairs,
                                          args.seed)
    runners = {
        "dph_head": lambda: run_dph(settings, args, source, "head", train, held_out),
        "dph_lora": lambda: run_dph(settings, args, source, "lora", train, held_out),
        "reward_model": lambda: run_reward_model(settings, args, source, train, held_out),
        "dpo": lambda: run_dpo(settings, args, source, train, held_out),
    }
    results = {}
    for name in args.methods.split(","):
        print(f"--- {name}", file=sys.stderr, flush=True)
        results[name] = runners[name]()
    scored = report_records(held_out)
    heldout = {name: pairwise_report(scored, results[name].pop("margins"), args.seed) for name in results}
    for name, block in heldout.items():
        print(f"{name}: {block['summary']}", file=sys.stderr, flush=True)
    dpo_step = results.get("dpo", {}).get("seconds_per_step")
    report = {
        "data": {"file": args.data.name, "pairs_fitting": fitting, "train_pairs": len(train),
                 "eval_pairs": len(held_out),
                 "split": "by first human turn: no opening question on both sides",
                 "max_length": args.max_length},
        "model": args.model, "device": str(resolve_device(settings.device)),
        "torch_threads": torch.get_num_threads(),
        "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "head_steps", "head_batch_size",
                                                    "head_learning_rate", "lm_learning_rate", "lora_r", "seed")},
        "heldout": heldout,
        "accuracy": {name: block["accuracy"] for name, block in heldout.items()},
        "seconds_per_step": {name: r["seconds_per_step"] for name, r in results.items()},
        "step_cost_vs_dpo": ({name: r["seconds_per_step"] / dpo_step for name, r in results.items()}
                             if dpo_step else None),
        "details": results,
        "wall_seconds": time.perf_counter() - started,
    }
    return report


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # trainers print their logs on stdout
        report = main()
    print(json.dumps(report, indent=1))
