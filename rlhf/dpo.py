"""Direct Preference Optimization on the arena's human preferences (TRL 1.16 DPOTrainer).

The `dpo` training kind (rlhf.runner: `run(ctx) -> JobResult`):

- data: decided votes of the chosen `sources` (human, imported data sets, or both;
  rlhf.training.job_preference_data) with a held-out split by prompt that stays put as
  votes arrive; prompts are wrapped by rlhf.generate.format_prompt so the model
  is trained on exactly the text it is given when it writes stories. Plain LMs (no chat
  template) get a space before the story, as they produce one after the "Story:" cue.
- model: LoRA (r=lora_r on the attention projections: c_attn with fan_in_fan_out on GPT-2,
  q_proj/v_proj on Llama-style models such as SmolLM2) when the base has more than
  LORA_THRESHOLD_PARAMS parameters, else full fine-tuning; `lora` overrides. With LoRA the
  reference model is the same network with the adapter disabled (TRL's `use_adapter(model,
  None)`), so no second copy is loaded; full fine-tuning loads a frozen reference copy.
- losses: "sigmoid" (DPO), "ipo" (beta is IPO's tau; TRL averages log-ratios per token),
  "robust" (rDPO, label_smoothing = assumed share of flipped labels, default 0.1).
  label_smoothing is refused for sigmoid and ipo, which ignore it in TRL 1.x.
- budget: preset "quick" (for the SmolLM2-135M starter on 2 CPU cores, under 10 minutes) or
  "full"; a preset gives max_steps, max_epochs (without an explicit max_steps, steps are
  sized by the data: at least one pass over the training pairs, at most max_epochs passes,
  so a few votes are not trained on 50 times, and at most STEP_CAPS), batch_size,
  max_length, max_eval_pairs and max_minutes. A CPU step's wall time
  depends on what else runs (figures: README), so quick is held to max_minutes (9) by TimeBudget:
  training stops early enough for the evaluation (shrunk to what fits, at least 4 pairs)
  and the save; max_steps only caps it on faster machines. max_minutes 0 means no limit
  (the full preset). Held-out votes beyond max_eval_pairs are left out of both sets.
- resume: checkpoints go to the job's output folder; a re-queued job continues from the
  last one (the runner finds it). The merged model is saved as a plain model and
  registered as a child of the base policy.
- metrics: `heldout` is rlhf.heldout.pairwise_report of the implicit reward margin
  beta * (log-ratio chosen - log-ratio rejected) of each held-out pair (accuracy, its 95%
  interval, the trivial baselines beside it); `epochs` the passes over the training pairs.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from rlhf.heldout import pairwise_report
from rlhf.params import MODEL_ID_RANGE, JobParams, check_field, param
from rlhf.runner import JobContext, JobResult, Kind, ModelSpec, model_writer
from rlhf.training import (
    ProgressCallback,
    chosen_model,
    dataset_names,
    datasets_param,
    epochs_made,
    fitted_max_length,
    job_preference_data,
    load_trainable_lm,
    lora_and_rate,
    lora_config,
    preference_dataset,
    sources_param,
    steps_for_data,
    trainer_device_args,
)
from storage.models import ModelRecord

MODEL_KIND = "dpo"
LOSS_TYPES = ("sigmoid", "ipo", "robust")
DEFAULT_ROBUST_SMOOTHING = 0.1
# Per preset: quick fits the SmolLM2-135M starter (LoRA) on 2 CPU cores in under 10 minutes.
# A CPU step's wall time varies with load, so quick is held to its minutes by a time budget
# (TimeBudget), and max_steps only caps it on faster machines.
PRESETS: dict[str, dict] = {
    "quick": {"max_steps": 40, "max_epochs": 3.0, "batch_size": 4, "max_length": 256, "max_eval_pairs": 16,
              "max_minutes": 9.0},
    "full": {"max_steps": 1000, "max_epochs": 3.0, "batch_size": 8, "max_length": 512, "max_eval_pairs": 512,
             "max_minutes": 0.0},
}
STEP_CAPS = {"quick": 200, "full": 20_000}  # quick's real limit is its max_minutes
# Evaluating one pair (policy and reference forwards) against training on one pair, in time.
EVAL_COST_PER_TRAIN_PAIR = 1.0
MIN_EVAL_PAIRS = 4
EVAL_SHARE_OF_BUDGET = 0.25
SAVE_RESERVE_S = 30.0
LOAD_SHARE, TRAIN_SHARE, EVAL_SHARE = 0.05, 0.80, 0.10  # the rest is merging and saving
NAME_LIMIT = 60


@dataclass(frozen=True)
class DPOParams(JobParams):
    """A DPO job's parameters, validated; the preset fills what was not given."""

    LABEL: ClassVar[str] = "DPO"
    REQUIRED: ClassVar[dict] = {"base": "Choose a base policy for DPO (parameter base: a policy id)."}

    base: int = param(help="the policy to start from (and the reference)", low=1, high=MODEL_ID_RANGE[1])
    loss_type: str = param("sigmoid", "sigmoid (DPO), ipo, or robust (rDPO: some labels assumed flipped)",
                           choices=LOSS_TYPES)
    beta: float = param(0.1, "strength of the pull towards the reference (IPO: tau)", low=0, high=10, low_open=True)
    label_smoothing: float | None = param(None, "robust only: assumed share of flipped labels (unset: 0.1)",
                                          low=0, high=0.49, low_open=True)
    preset: str = param("quick", "step budget: quick (minutes on CPU) or full (a GPU)", choices=PRESETS)
    max_steps: int = param(PRESETS["quick"]["max_steps"], "optimizer steps (without it: the preset's, capped at "
                           "max_epochs passes)", low=1, high=1_000_000)
    max_epochs: float = param(PRESETS["quick"]["max_epochs"], "passes over the pairs the preset's steps may make",
                              low=0, high=1000, low_open=True)
    learning_rate: float | None = param(None, "unset: 5e-5 with LoRA, 5e-6 for all weights", low=0, high=0.01,
                                        low_open=True)
    batch_size: int = param(PRESETS["quick"]["batch_size"], "preference pairs per step", low=1, high=256)
    lora: bool | None = param(None, "train a LoRA adapter (unset: for models over 50 M parameters)")
    lora_r: int = param(8, "LoRA rank", low=1, high=512)
    eval_fraction: float = param(0.2, "share of votes held out for evaluation", low=0, high=0.5)
    max_eval_pairs: int = param(PRESETS["quick"]["max_eval_pairs"], "held-out pairs evaluated at most",
                                low=1, high=1_000_000)
    min_pairs: int = param(8, "decided votes needed to train", low=2, high=1_000_000)
    min_annotators: int = param(1, "only story pairs judged by at least this many people", low=1, high=1000)
    max_length: int = param(PRESETS["quick"]["max_length"], "tokens of prompt + story", low=16, high=32768)
    max_minutes: float = param(PRESETS["quick"]["max_minutes"], "stop training in time for evaluation and "
                               "saving; 0: no limit", low=0, high=7 * 24 * 60)
    sources: str = sources_param()
    datasets: str | None = datasets_param()

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        preset = check_field(cls, "preset", given.get("preset", "quick"))
        return {**PRESETS[preset], "preset": preset}

    def __post_init__(self) -> None:
        super().__post_init__()
        dataset_names(self.sources, self.datasets)
        if self.label_smoothing is not None and self.loss_type != "robust":
            raise ValueError(
                f"label_smoothing applies to loss_type robust only; TRL's {self.loss_type} loss ignores it."
            )

    @property
    def smoothing(self) -> float:
        if self.loss_type != "robust":
            return 0.0
        return DEFAULT_ROBUST_SMOOTHING if self.label_smoothing is None else float(self.label_smoothing)

    def steps_for(self, train_pairs: int) -> int:
        """An explicit max_steps as is; else the preset's, sized by the data (steps_for_data)."""
        if "max_steps" in self.explicit:
            return self.max_steps
        return steps_for_data(self.max_steps, STEP_CAPS[self.preset], train_pairs, self.batch_size, self.max_epochs)


class TimeBudget(TrainerCallback):
    """Stops training early enough that evaluation and saving still fit before the deadline.

    Step times (with their logging and checkpoint saves) are measured as training goes;
    evaluating one held-out pair is taken to cost EVAL_COST_PER_TRAIN_PAIR of the time of
    training on one pair. Evaluation is given at most EVAL_SHARE_OF_BUDGET of the budget.
    """

    def __init__(self, deadline: float | None, budget_s: float, batch_size: int):
        self.deadline, self.budget_s, self.batch_size = deadline, budget_s, batch_size
        self.eval_pairs = 0
        self.durations: list[float] = []
        self.stopped_early = False
        self._mark = time.monotonic()

    def seconds_per_pair(self) -> float | None:
        if not self.durations:
            return None
        steady = self.durations[1:] or self.durations  # the first step includes warm-up
        return sum(steady) / len(steady) / self.batch_size

    def eval_pairs_that_fit(self) -> int:
        per_pair = self.seconds_per_pair()
        if self.deadline is None or per_pair is None:
            return self.eval_pairs
        left = self.deadline - time.monotonic() - SAVE_RESERVE_S
        fit = int(left / (per_pair * EVAL_COST_PER_TRAIN_PAIR))
        return max(min(self.eval_pairs, MIN_EVAL_PAIRS), min(self.eval_pairs, fit))

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        self.durations.append(now - self._mark)
        self._mark = now
        if self.deadline is None:
            return
        per_pair = self.seconds_per_pair()
        evaluation = min(self.eval_pairs * per_pair * EVAL_COST_PER_TRAIN_PAIR, EVAL_SHARE_OF_BUDGET * self.budget_s)
        if now + per_pair * self.batch_size + evaluation + SAVE_RESERVE_S > self.deadline:
            control.should_training_stop = True
            self.stopped_early = state.global_step < state.max_steps


def implicit_reward_margins(model, ref_model, tokenizer, records: list[dict], beta: float, max_length: int,
                            batch_size: int) -> list[float]:
    """beta * (log-ratio chosen - log-ratio rejected) per preference record, the log-ratio
    being log pi(story | prompt) - log pi_ref(story | prompt) over the story and its end
    token. The reference is ref_model, or with LoRA (ref_model None) the same network with
    its adapter disabled, as in training."""
    from rlhf.scoring import completion_logps, token_collator, token_pairs

    device = next(model.parameters()).device
    collate = token_collator(tokenizer.pad_token_id)
    rows = token_pairs(tokenizer, records, max_length)
    margins: list[float] = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
            ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            policy = completion_logps(model(input_ids=ids, attention_mask=mask).logits, ids, completion)
            with model.disable_adapter() if ref_model is None else contextlib.nullcontext():
                reference = completion_logps((ref_model or model)(input_ids=ids, attention_mask=mask).logits,
                                             ids, completion)
            chosen, rejected = (policy - reference).chunk(2)
            margins.extend((beta * (chosen - rejected)).tolist())
    return margins


@contextlib.contextmanager
def _quiet_datasets():
    """No datasets progress bars in job logs (they are \\r-redrawn lines); restored after."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _finite(value):
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def _policy_name(base: ModelRecord, loss_type: str) -> str:
    suffix = "-dpo" if loss_type == "sigmoid" else f"-dpo-{loss_type}"
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", base.name)[: NAME_LIMIT - len(suffix) - 3]
    return stem + suffix


def run(ctx: JobContext) -> JobResult:
    """Train a DPO child of params["base"] on the human votes."""
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    p, store, settings, progress = ctx.params, ctx.store, ctx.settings, ctx.progress
    deadline = time.monotonic() + 60 * p.max_minutes if p.max_minutes else None
    base = chosen_model(store, p.base, "base policy")
    train_records, eval_records, snapshot = job_preference_data(store, p)
    eval_records = eval_records[: p.max_eval_pairs]

    progress(0.0, f"loading {base.name}")
    model, tokenizer = load_trainable_lm(base.source, settings.hub_token)
    use_cache = getattr(model.config, "use_cache", True)  # Trainer sets it to False in the config it saves
    use_lora, learning_rate = lora_and_rate(model, p.lora, p.learning_rate)
    max_length = fitted_max_length(model, p, base.name)
    peft_config = lora_config(model, p.lora_r) if use_lora else None
    # Full fine-tuning needs a frozen reference; with LoRA the adapter-disabled model is the reference.
    ref_model = None
    if not use_lora:
        ref_model = AutoModelForCausalLM.from_pretrained(base.source, token=settings.hub_token, dtype=torch.float32)

    steps = p.steps_for(len(train_records))
    args = DPOConfig(
        output_dir=str(ctx.output_dir),
        **trainer_device_args(settings),
        max_steps=steps,
        save_steps=max(1, steps // 4),
        per_device_train_batch_size=p.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=steps // 10,
        beta=p.beta,
        loss_type=[p.loss_type],
        label_smoothing=p.smoothing,
        max_length=max_length,
        precompute_ref_log_probs=False,  # per step it costs one forward; precomputing scales with all votes
        seed=0,
    )
    train_set = preference_dataset(train_records, tokenizer)
    progress(LOAD_SHARE,
             f"DPO ({p.loss_type}, {'LoRA' if use_lora else 'full'}) on {len(train_records)} pairs, {steps} steps")
    budget = TimeBudget(deadline, 60 * p.max_minutes, p.batch_size)
    with _quiet_datasets():
        trainer = DPOTrainer(
            model=model, ref_model=ref_model, args=args, train_dataset=train_set,
            processing_class=tokenizer, peft_config=peft_config,
            callbacks=[ProgressCallback(progress, start=LOAD_SHARE, share=TRAIN_SHARE), budget],
        )
    budget.eval_pairs = len(eval_records)
    if len(trainer.train_dataset) == 0:
        raise ValueError(f"Every training prompt fills max_length ({max_length} tokens); raise max_length.")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=ctx.resume_from)
    train_seconds = time.perf_counter() - started
    resumed_from = ctx.resumed_step if ctx.resume_from else None

    eval_records = eval_records[: budget.eval_pairs_that_fit()]  # the quick budget: fewer, never none
    progress(LOAD_SHARE + TRAIN_SHARE, f"evaluating on {len(eval_records)} held-out pairs")
    heldout = pairwise_report(eval_records, implicit_reward_margins(
        trainer.model, ref_model, tokenizer, eval_records, p.beta, max_length, p.batch_size))

    progress(LOAD_SHARE + TRAIN_SHARE + EVAL_SHARE, "saving the model")
    trained = trainer.model
    if isinstance(trained, PeftModel):
        trained = trained.merge_and_unload()
    trained.config.use_cache = use_cache
    folder = ctx.save_model(model_writer(trained, tokenizer))

    last_train = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
    metrics = {
        **snapshot,
        "train_pairs": len(trainer.train_dataset),
        "loss_type": p.loss_type,
        "beta": p.beta,
        "label_smoothing": p.smoothing if p.loss_type == "robust" else None,
        "lora": use_lora,
        "lora_r": p.lora_r if use_lora else None,
        "learning_rate": learning_rate,
        "batch_size": p.batch_size,
        "max_length": max_length,
        "preset": p.preset,
        "steps": trainer.state.global_step,
        "epochs": epochs_made(trainer.state.global_step, p.batch_size, len(trainer.train_dataset)),
        "resumed_from_step": resumed_from,
        "max_minutes": p.max_minutes or None,
        "stopped_for_time": budget.stopped_early,
        "train_seconds": round(train_seconds, 1),
        "train_loss": _finite(result.training_loss),
        "train_loss_last": _finite(last_train.get("loss")),
        "train_reward_accuracy_last": _finite(last_train.get("rewards/accuracies")),
        "heldout": heldout,
    }
    name = _policy_name(base, p.loss_type)
    return JobResult(models=[ModelSpec(
        name=name, kind=MODEL_KIND, path=folder, parent=base, metrics=metrics,
    )], message=f"{name}: {heldout['summary']}")


KIND = Kind(
    name="dpo", params=DPOParams, run=run, needs_base_policy=True, learns_from_votes=True,
    model_params={"base": "base policy"},
    help="Direct Preference Optimization on the preferences (DPOTrainer; loss_type sigmoid, ipo or robust).",
)
