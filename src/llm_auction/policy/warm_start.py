"""pi_0: a tokenizer, a tiny base model and SFT on what a plain pre-trained LLM would write.

The SFT responses are well-formed organic answers with 0-3 ads chosen for textual relevance with
noise and never for their bids: the distribution shift LLM-Auction starts from, well-formed but far
from revenue-optimal. IRPO has to teach the policy what bids are for.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from llm_auction.config import Settings, WarmStartConfig
from llm_auction.contracts import AuctionRequest
from llm_auction.errors import RegistryError
from llm_auction.mechanism.diagnostics import bid_sensitivity, format_report
from llm_auction.mechanism.grammar import render_response
from llm_auction.policy.allocator import LLMPolicy, prompts_for
from llm_auction.policy.generation import TransformersGenerator
from llm_auction.policy.model import (
    CARD_FILE,
    build_model,
    check_prompt_format,
    count_parameters,
    load_policy,
    save_policy,
    write_card,
)
from llm_auction.policy.tokenizer import train_tokenizer
from llm_auction.text import bank
from llm_auction.text.organic import organic_answer
from llm_auction.text.reading import bridge_for, text_relevance, topic_of
from llm_auction.tracking import registry
from llm_auction.tracking.runs import tracked_run

logger = logging.getLogger(__name__)


def imitation_response(
    request: AuctionRequest, cfg: WarmStartConfig, n_sentences: int, max_ads: int, rng: np.random.Generator
) -> str:
    """An answer a plain LLM might write: organic text, ads picked by relevance plus noise, bid-blind.

    The chosen ads sit together after one random sentence, in the order the prompt lists them, as
    a plain model's "sponsored" aside would: a tiny model learns that layout without repeating a
    marker. Each is led by a bridge naming its product with probability `bridge_prob`, so native
    introductions are in pi_0's support. Which ads, how many, in what order, where and which get a
    bridge is what IRPO changes later.
    """
    sentences = organic_answer(request.query, n_sentences, rng)
    topic = topic_of(request.query)
    relevance = np.array([text_relevance(topic, ad.text) for ad in request.ads])
    n_ads = min(int(rng.choice(len(cfg.ad_count_probs), p=cfg.ad_count_probs)), len(request.ads), max_ads)
    if request.max_ads is not None:
        n_ads = min(n_ads, request.max_ads)
    scores = relevance + cfg.relevance_noise * rng.gumbel(size=len(relevance))
    chosen = sorted(int(i) for i in np.argsort(-scores, kind="stable")[:n_ads])
    slot = int(rng.integers(1, len(sentences) + 1))
    templates = rng.integers(len(bank.BRIDGE_TEMPLATES), size=len(chosen))
    bridged = rng.random(len(chosen)) < cfg.bridge_prob
    leads = {
        i: b
        for i, t, on in zip(chosen, templates, bridged)
        if on and (b := bridge_for(request.ads[i].text, t))
    }
    return render_response(sentences, [(slot, i) for i in chosen], leads)


def sft_dataset(prompts: Sequence[str], responses: Sequence[str]) -> Dataset:
    """TRL's prompt-completion format: the loss falls on the completion only."""
    return Dataset.from_dict({"prompt": list(prompts), "completion": [" " + r for r in responses]})


def trainer_defaults(settings: Settings) -> dict[str, Any]:
    """Arguments every TRL trainer of the policy shares: seeded, no checkpoints, no reporters, fp32 on CPU."""
    return {
        "lr_scheduler_type": "cosine",
        "max_length": settings.policy.model.max_length,
        "save_strategy": "no",
        "report_to": [],
        "bf16": False,
        "gradient_checkpointing": False,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    settings: Settings,
    output_dir: Path | None = None,
) -> dict[str, Any]:
    """Supervised fine-tuning with TRL's SFTTrainer; returns the training summary."""
    cfg = settings.policy.warm_start
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=str(output_dir or scratch),
            num_train_epochs=cfg.epochs,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            warmup_steps=0.05,
            weight_decay=0.0,
            logging_steps=10,
            **trainer_defaults(settings),
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "steps": int(result.global_step),
        "seconds": seconds,
        "train_loss": float(result.training_loss),
        "first_loss": float(losses[0]) if losses else float("nan"),
        "last_loss": float(losses[-1]) if losses else float("nan"),
    }


def register_bootstrap_policy(settings: Settings, run_id: str, card: dict[str, Any]) -> str:
    """pi_0 is the root of the policy's lineage (alias `pi0`), and the champion until IRPO promotes a
    better one.
    """
    name = settings.irpo.registered_model
    held = card["held_out"]
    version = registry.register_version(
        settings.tracking,
        name,
        run_id,
        "policy",
        tags={
            "lineage.epoch": 0,
            "llm_auction.step": "policy_init",
            "metric.well_formed_rate": held["well_formed_rate"],
        },
        description=(
            f"pi_0: SFT warm start ({card['sft']['requests']} requests, {card['sft']['steps']} steps); "
            f"{held['well_formed_rate']:.1%} well-formed on {held['requests']} held-out requests"
        ),
    )
    registry.set_alias(settings.tracking, name, registry.INITIAL, version)
    if registry.alias_version(settings.tracking, name, registry.CHAMPION) is None:
        registry.promote(
            settings.tracking, name, version, "policy-init", "bootstrap: pi_0 starts as champion"
        )
    return version


def init_policy(
    settings: Settings,
    train: Sequence[AuctionRequest],
    held_out: Sequence[AuctionRequest],
    profiles: Mapping[str, str],
    out_dir: Path,
    n_eval: int | None = None,
) -> dict[str, Any]:
    """Tokenizer + base model + SFT -> pi_0 in `out_dir`; returns its card (also saved beside it).

    `train` are the requests pi_0 imitates a plain LLM on (the first `policy.warm_start.n_requests`
    are used), `held_out` those its card reports on; both public request files in production.
    With `policy.base_model_dir` set (cluster), that model and its tokenizer are fine-tuned instead
    of building the tiny local one.
    """
    policy_cfg = settings.policy
    train = list(train[: policy_cfg.warm_start.n_requests])
    rng = np.random.default_rng([settings.seed, 3])
    max_ads, n_sentences = settings.mechanism.max_ads, settings.baselines.organic_sentences
    responses = [imitation_response(r, policy_cfg.warm_start, n_sentences, max_ads, rng) for r in train]
    prompts = prompts_for(train, profiles)
    if policy_cfg.base_model_dir is not None:
        model, tokenizer = load_policy(policy_cfg.base_model_dir)
    else:
        tokenizer = train_tokenizer([*prompts, *responses], policy_cfg.model.vocab_size)
        model = build_model(policy_cfg.model, tokenizer, settings.seed)
    logger.info("SFT of pi_0: %d requests, %d parameters", len(train), count_parameters(model))
    sft = train_sft(model, tokenizer, sft_dataset(prompts, responses), settings)
    model.eval()

    evaluated = held_out[: n_eval or len(held_out)]
    policy = LLMPolicy(TransformersGenerator(model, tokenizer, policy_cfg.generation), profiles, name="pi_0")
    start = time.perf_counter()
    samples = policy.allocate(evaluated, np.random.default_rng([settings.seed, 4]))
    sample_seconds = time.perf_counter() - start
    card = {
        "policy": "pi_0",
        "parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "base_model_dir": str(policy_cfg.base_model_dir) if policy_cfg.base_model_dir else None,
        "sft": {**sft, "requests": len(train)},
        "held_out": {
            "requests": len(evaluated),
            "sample_seconds": sample_seconds,
            **format_report(evaluated, samples, max_ads),
            **bid_sensitivity(evaluated, samples),
        },
        "training_data": {**format_report(train, responses, max_ads), **bid_sensitivity(train, responses)},
        "seed": settings.seed,
    }
    save_policy(model, tokenizer, out_dir, card)
    with tracked_run(settings.tracking, "policy-init", {"llm_auction.step": "policy_init"}) as run:
        if run is not None:
            run.log_params(
                {"seed": settings.seed, **policy_cfg.model.model_dump(), **policy_cfg.warm_start.model_dump()}
            )
            run.log_metrics(
                {
                    "sft_train_loss": sft["train_loss"],
                    "heldout_well_formed_rate": card["held_out"]["well_formed_rate"],
                    "heldout_bid_selection_corr": card["held_out"]["bid_selection_corr"],
                    "heldout_mean_ads": card["held_out"]["mean_ads"],
                }
            )
            run.log_artifacts(out_dir, "policy")
            card["mlflow_run_id"] = run.run_id
            card["registered_version"] = register_bootstrap_policy(settings, run.run_id, card)
            write_card(out_dir, card)
    return card


def register_existing_policy(settings: Settings, directory: Path) -> str:
    """A pi_0 made earlier (`policy init`, its card beside it) becomes a registered version and champion."""
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"pi_0 {directory}: no {CARD_FILE}; is it a `policy init` output?")
    check_prompt_format(directory)
    card = json.loads(card_path.read_text())
    with tracked_run(settings.tracking, "policy-init", {"llm_auction.step": "policy_init"}) as run:
        if run is None:
            raise RegistryError("tracking.uri: registering pi_0 needs an MLflow tracking URI")
        run.log_artifacts(str(directory), "policy")
        return register_bootstrap_policy(settings, run.run_id, card)
