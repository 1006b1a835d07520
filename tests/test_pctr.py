"""The pCTR reward model (Eq. 3-4) and the reward R (Eq. 5), trained on simulated feedback."""

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import HashEncoder, random_traffic_frame
from llm_auction.config import PCTRConfig, load_config
from llm_auction.contracts import AdCandidate, AuctionRequest
from llm_auction.errors import UnsafeCheckpointError
from llm_auction.features.encoder import TextEncoder
from llm_auction.mechanism.payments import expected_payments
from llm_auction.reward import pctr
from llm_auction.reward.metrics import auc, expected_calibration_error, log_loss
from llm_auction.reward.pctr import PCTRModel, text_matches, train_pctr, word_overlap
from llm_auction.reward.reward import impression_rows, score_responses, table_lookup


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> TextEncoder:
    return TextEncoder(cache_path=tmp_path_factory.mktemp("enc") / "cache.sqlite")


@pytest.fixture(scope="module")
def logged():
    """Random-insertion traffic on a world: explores positions and ads, like a logging policy should."""
    settings = load_config(environ={}, overrides={"world": {"n_requests": 5000}, "tracking": {"uri": None}})
    return random_traffic_frame(settings)


@pytest.fixture(scope="module")
def model(logged, encoder) -> PCTRModel:
    env, frame, _ = logged
    return train_pctr(frame, encoder, env.settings.pctr, seed=0)


def test_metrics_on_hand_computed_cases():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert log_loss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))
    assert expected_calibration_error(
        np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])
    ) == pytest.approx(0)
    assert expected_calibration_error(np.array([1, 1]), np.array([0.25, 0.25]), n_bins=4) == pytest.approx(
        0.75
    )


def test_text_matches_come_from_the_words_alone():
    """Shared words count, whatever they are; knowing that two different words name the same topic
    (a taxonomy) does not: the features must not hand psi the simulator's hidden relevance."""
    frame = pd.DataFrame(
        {
            "query": ["best running shoes this year"] * 3 + ["where can i buy cheap flights"] * 2,
            "ad_text": [
                "novaline running shoes: top rated choice, try it today",
                "get new trail shoe from bluebox now",
                "bluebox coffee grinders for every budget",
                "peakhub airline tickets: great value choice",  # the query's topic, no shared word
                "peakhub garden tools: great value choice",
            ],
            "profile_text": [
                "a 30 year old who likes running and tea",
                "a 30 year old who likes sport and fitness",  # the ad's category, no shared word
                "a 30 year old who likes sport and fitness",
                "likes travel and new places",
                "likes travel and new places",
            ],
        }
    )
    query, profile = text_matches(frame)
    assert query[0] > query[1] > query[2] == 0.0  # two words shared, then one ("shoe" = "shoes"), then none
    assert query[3] == query[4] == 0.0
    assert profile[0] > 0.0 and profile[1] == profile[2] == profile[3] == profile[4] == 0.0
    # any vocabulary works, none of it known in advance
    assert word_overlap("Zorblax widgets?", "acme ZORBLAX widget") == pytest.approx(1.0)
    assert word_overlap("the and of", "the and of") == 0.0  # stopwords only
    no_texts = text_matches(frame[["query"]])
    assert all((v == 0).all() and len(v) == len(frame) for v in no_texts)


def test_an_ads_context_is_the_sentence_right_before_its_marker():
    response = "Pack light. Book early, fly midweek. [AD 3] [AD 1] Looking for bags? [AD 2] Done."
    assert [pctr.ad_context(response, p) for p in (1, 2, 3)] == [
        "Book early, fly midweek.",
        "",  # follows another ad
        "Looking for bags?",
    ]
    assert pctr.ad_context("[AD 1] Pack light.", 1) == ""  # opens the answer
    assert pctr.ad_context(response, 4) == ""  # no fourth ad
    frame = pd.DataFrame({"response": [response] * 2, "position": [1, 3]})
    assert pctr.ad_contexts(frame).tolist() == ["Book early, fly midweek.", "Looking for bags?"]
    assert pctr.ad_contexts(frame.assign(ad_context=["kept", None])).tolist() == ["kept", ""]


def test_pctr_module_does_not_import_the_world_or_its_taxonomy():
    tree = ast.parse(Path(pctr.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    forbidden = ("llm_auction.baselines", "llm_auction.world", "llm_auction.simulator", "llm_auction.text")
    assert not [m for m in imported if m.startswith(forbidden) or "catalog" in m or "taxonomy" in m]


def test_pctr_learns_and_is_calibrated(model: PCTRModel, logged):
    _, frame, rollout = logged
    test = model.metrics["test"]
    assert model.metrics["best_epoch"] >= 1 and test["n"] > 300
    # From the texts alone and ~3,500 training impressions psi reaches about 0.66 here (0.62 with
    # its similarities unstandardised; 0.58 without the lead-in, `pctr.context`): clearly above chance.
    assert test["auc"] > 0.63, test
    assert test["ece"] < 0.05, test
    positions = test["calibration_by_position"]
    assert positions["1"]["predicted"] > positions["2"]["predicted"]


def test_pctr_orders_positions_and_relevance_like_the_simulator(model: PCTRModel, logged, encoder):
    env, frame, _ = logged
    # Each ad keeps the sentence it follows: position alone moves (moving the marker would change
    # the lead-in too, which psi reads apart from the position). Positions 1 and 2 only: random
    # insertion logs at most `baselines.random_max_ads` = 2 ads, so psi never saw a third.
    rows = frame.sample(400, random_state=0)
    rows = rows.assign(ad_context=pctr.ad_contexts(rows))
    by_position = [model.predict(rows.assign(position=p), encoder).mean() for p in (1, 2)]
    assert by_position[0] > by_position[1]
    # the same users and queries, with a random ad of the query's own topic (the simulator's
    # relevance 1) against a random ad of another category (relevance 0)
    queries = env.world.queries.set_index("text")
    ads = env.world.ads
    rng = np.random.default_rng(0)
    on, off = [], []
    for row in rows.itertuples(index=False):
        category, topic = queries.loc[row.query, ["category", "topic"]]
        same = ads[(ads["category"] == category) & (ads["topic"] == topic)]
        same = same if len(same) else ads[ads["category"] == category]
        others = ads[ads["category"] != category]
        on.append(same.iloc[rng.integers(len(same))])
        off.append(others.iloc[rng.integers(len(others))])
    relevant = model.predict(rows.assign(ad_id=[a.ad_id for a in on], ad_text=[a.text for a in on]), encoder)
    other = model.predict(rows.assign(ad_id=[a.ad_id for a in off], ad_text=[a.text for a in off]), encoder)
    # From public text and this little traffic psi learns about x1.8 (higher for 95% of the rows),
    # where logged click rates differ about x3.8; with its similarities unstandardised it learned
    # x1.1 (68% of the rows), the weights on cosines that differ by hundredths hardly moving.
    assert relevant.mean() > 1.4 * other.mean()
    assert (relevant > other).mean() > 0.85


def test_pctr_round_trips_through_safetensors(model: PCTRModel, logged, encoder, tmp_path: Path):
    _, frame, _ = logged
    model.save(tmp_path / "pctr")
    loaded = PCTRModel.load(tmp_path / "pctr")
    rows = frame.head(50)
    assert np.allclose(loaded.predict(rows, encoder), model.predict(rows, encoder), atol=1e-6)
    (tmp_path / "pctr" / "model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeCheckpointError):
        PCTRModel.load(tmp_path / "pctr")


def test_similarities_are_read_standardised_and_an_older_psi_reads_them_raw(
    model: PCTRModel, logged, encoder, tmp_path: Path
):
    _, frame, _ = logged
    rows = frame.head(200)
    spec_path = model.save(tmp_path / "older") / pctr.CONFIG
    spec = json.loads(spec_path.read_text())
    del spec["similarity_mean"], spec["similarity_std"]  # as psi versions registered before
    spec_path.write_text(json.dumps(spec))
    raw = PCTRModel.load(tmp_path / "older").batch(rows, encoder).similarities.numpy()
    scaled = model.batch(rows, encoder).similarities.numpy()
    assert np.allclose(model.standardised(raw), scaled, atol=1e-5)
    # the query-ad cosine spreads by hundredths raw; as a z-score of the training split, by about 1
    assert raw[:, 0].std() < 0.2 and 0.5 < scaled[:, 0].std() < 2 and abs(scaled[:, 0].mean()) < 0.5


def test_psi_can_read_how_well_the_answer_addresses_its_query(
    model: PCTRModel, logged, encoder, tmp_path: Path
):
    """`pctr.answer_relevance`: the query-response cosine becomes an input; a psi saved before the
    option existed loads without it and scores as it did."""
    _, frame, _ = logged
    rows = frame.head(50)
    cfg = model.cfg.model_copy(update={"answer_relevance": True})
    net = pctr.PCTRNet(len(model.users), len(model.ads), len(model.numeric_columns), cfg)
    reading = PCTRModel(
        net, cfg, model.users, model.ads, model.numeric_columns, model.numeric_mean, model.numeric_std
    )
    cosine = (encoder.encode(rows["query"].tolist()) * encoder.encode(rows["response"].tolist())).sum(1)
    read = reading.batch(rows, encoder).similarities.numpy()
    assert np.allclose(read[:, 4], cosine, atol=1e-5)  # after the four cosines with the ad and profile
    assert read.shape[1] == model.batch(rows, encoder).similarities.shape[1] + 1
    assert reading.predict(rows, encoder).shape == (len(rows),)

    spec_path = model.save(tmp_path / "older") / pctr.CONFIG
    spec = json.loads(spec_path.read_text())
    del spec["config"]["answer_relevance"]  # as psi versions registered before the option
    spec_path.write_text(json.dumps(spec))
    loaded = PCTRModel.load(tmp_path / "older")
    assert not loaded.cfg.answer_relevance
    assert np.allclose(loaded.predict(rows, encoder), model.predict(rows, encoder), atol=1e-6)


def test_unseen_users_and_ads_still_get_text_based_scores(model: PCTRModel, logged, encoder):
    _, frame, _ = logged
    rows = frame.head(200)
    cold = model.predict(rows.assign(user_id="new-user", ad_id="new-ad"), encoder)
    assert np.all((cold > 0) & (cold < 1)) and cold.std() > 0


def test_reward_is_bid_weighted_pctr_plus_page_term(model: PCTRModel, logged, encoder):
    env, _, _ = logged
    ads = env.world.ads
    users = env.world.users[["user_id", "profile_text"]]
    request = env.world.auction_requests(limit=1)[0]
    ad_lookup = table_lookup(
        ads[["ad_id", "ad_text" if "ad_text" in ads else "text", "category"]].rename(
            columns={"text": "ad_text"}
        ),
        "ad_id",
    )
    responses = ["No ads here.", "Good. [AD 1] Tips. [AD 2]", "Good. [AD 1] [AD 1] [ad 9]"]
    scored = score_responses(
        model, encoder, [request] * 3, responses, table_lookup(users, "user_id"), ad_lookup
    )
    assert scored.rewards[0] == 0.0
    rows = scored.ads[scored.ads["response_number"] == 1]
    assert list(rows["position"]) == [1, 2]
    assert scored.rewards[1] == pytest.approx(float(expected_payments(rows["bid"], rows["pctr"]).sum()))
    assert set(scored.ads["response_number"]) == {1, 2}
    paged = score_responses(
        model, encoder, [request] * 3, responses, table_lookup(users, "user_id"), ad_lookup, lambda_page=0.5
    )
    assert np.allclose(paged.rewards - scored.rewards, [0.5, 0.5, 0.0])  # the third one is malformed


def test_scored_ads_carry_their_lead_in_from_the_platforms_parse(logged):
    env, _, _ = logged
    request = env.world.auction_requests(limit=1)[0]
    unknown = f"[AD {len(request.ads) + 1}]"  # not one of this request's ads: not an impression
    responses = ["Pack light. Book early. [AD 2] [AD 1]", f"Intro. {unknown} Try this. [AD 1]"]
    rows, errors = impression_rows([request] * 2, responses, max_ads=None)
    assert rows["ad_context"].tolist() == ["Book early.", "", "Try this."]
    assert errors.tolist() == [0, 1]
    # Read from the response and the logged position alone, psi would agree where every marker is
    # one of the request's ads; the scoring path passes its own parse, so an unknown marker cannot
    # shift the positions.
    assert pctr.ad_contexts(rows.drop(columns="ad_context")).tolist()[:2] == ["Book early.", ""]


def test_reward_rises_with_the_bid(model: PCTRModel, logged, encoder):
    env, _, _ = logged
    request = env.world.auction_requests(limit=1)[0]
    richer = AuctionRequest(
        **{
            **request.model_dump(),
            "ads": [
                AdCandidate(**{**a.model_dump(), "bid": a.bid * (3 if i == 0 else 1)})
                for i, a in enumerate(request.ads)
            ],
        }
    )
    ads = env.world.ads.rename(columns={"text": "ad_text"})[["ad_id", "ad_text", "category"]]
    users = env.world.users[["user_id", "profile_text"]]
    scored = score_responses(
        model,
        encoder,
        [request, richer],
        ["Hi. [AD 1]", "Hi. [AD 1]"],
        table_lookup(users, "user_id"),
        table_lookup(ads, "ad_id"),
    )
    assert scored.rewards[1] == pytest.approx(3 * scored.rewards[0])
    assert isinstance(scored.ads, pd.DataFrame)


def test_train_and_register_logs_the_model_to_mlflow(logged, encoder, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from llm_auction.reward.training import train_and_register

    env, frame, _ = logged
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = env.settings.model_copy(
        update={
            "tracking": env.settings.tracking.model_copy(
                update={"uri": uri, "artifact_location": str(tmp_path / "artifacts")}
            )
        }
    )
    model, card = train_and_register(
        settings, frame, encoder, tmp_path / "pctr", lineage={"window": "w1", "epoch": 0}
    )
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version("llm-auction-pctr", card["registered_version"])
    assert version.tags["lineage.window"] == "w1" and float(version.tags["test_auc"]) == pytest.approx(
        card["test_auc"], abs=1e-4
    )
    assert "test AUC" in version.description
    run = client.get_run(card["mlflow_run_id"])
    assert run.data.metrics["test_ece"] == pytest.approx(card["test_ece"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "pctr")} >= {
        "pctr/model.safetensors",
        "pctr/pctr_config.json",
    }
    assert PCTRModel.load(tmp_path / "pctr").users == model.users


def test_encoder_disk_cache_is_written_on_flush_and_reused(tmp_path: Path):
    path = tmp_path / "cache.sqlite"
    first = TextEncoder(cache_path=path)
    vectors = first.encode(["best running shoes this year", "cheap flights", "best running shoes this year"])
    assert first.n_encoded == 2 and not path.exists()
    first.flush()
    second = TextEncoder(cache_path=path)
    assert np.allclose(second.encode(["cheap flights"]), vectors[1:2]) and second.n_encoded == 0


def tiny_frame(n_requests: int = 60, seed: int = 0) -> pd.DataFrame:
    """Three ads per request, clicks more likely at position 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_requests):
        for position in (1, 2, 3):
            ad = int(rng.integers(10))
            rows.append(
                {
                    "request_id": f"r{r}",
                    "query": f"query {r % 7}",
                    "response": f"response {r}",
                    "user_id": f"u{r % 5}",
                    "ad_id": f"a{ad}",
                    "ad_text": f"ad text {ad}",
                    "profile_text": f"profile {r % 5}",
                    "position": position,
                    "n_ads": 3,
                    "n_same_category": 0,
                    "user_ctr_7d": float(rng.random()),
                    "clicked": int(rng.random() < 0.5 / position),
                }
            )
    return pd.DataFrame(rows)


TINY = PCTRConfig(max_epochs=2, hidden=(8,), text_dim=4, id_dim=2)


def test_tiny_training_runs_and_missing_statistics_count_as_zero():
    frame = tiny_frame()
    frame.loc[::4, "user_ctr_7d"] = np.nan  # no history yet: a missing statistic, not an error
    model = train_pctr(frame, HashEncoder(), TINY, seed=0)
    assert model.metrics["best_epoch"] >= 1 and model.calibration[0] > 0
    assert np.isfinite(model.predict(frame, HashEncoder())).all()


def test_non_finite_features_are_refused_naming_the_column():
    frame = tiny_frame()
    frame.loc[[3, 7], "user_ctr_7d"] = [np.inf, -np.inf]
    with pytest.raises(
        ValueError, match=r"`user_ctr_7d` has infinite values in 2 of 180 rows \(first at index \[3, 7\]"
    ):
        train_pctr(frame, HashEncoder(), TINY, seed=0)
    frame = tiny_frame().drop(columns="ad_text")
    embeddings = HashEncoder().encode([f"ad {a}" for a in frame["ad_id"]])
    embeddings[5, 0] = np.nan
    frame["ad_embedding"] = list(embeddings)
    with pytest.raises(
        ValueError, match=r"`ad_embedding` has non-finite values in 1 of 180 rows \(first at index \[5\]"
    ):
        train_pctr(frame, HashEncoder(), TINY, seed=0)


def test_diverging_training_is_a_clear_error_not_a_crash_in_early_stopping():
    huge = TINY.model_copy(update={"learning_rate": 1e30})
    with pytest.raises(
        ValueError, match=r"validation log loss is nan at epoch 1 \(learning_rate=1e\+30.*finite"
    ):
        train_pctr(tiny_frame(), HashEncoder(), huge, seed=0)


def test_an_empty_validation_split_is_named():
    frame = tiny_frame(n_requests=40)
    split = pctr.split_by_request(frame["request_id"], TINY)
    kept = frame[split != "validation"]
    with pytest.raises(ValueError, match="the validation split is empty"):
        train_pctr(kept, HashEncoder(), TINY, seed=0)


def test_platt_scaling_calibrates_and_never_inverts_the_ranking():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 1.5, 4000)
    labels = torch.tensor((rng.random(4000) < 1 / (1 + np.exp(-true_logits))).astype(np.float32))
    a, b = pctr._fit_platt(torch.tensor(3 * true_logits, dtype=torch.float32), labels)
    assert a == pytest.approx(1 / 3, rel=0.15) and abs(b) < 0.2
    # logits anti-correlated with the clicks: the unconstrained fit would flip the sign
    a, b = pctr._fit_platt(torch.tensor(-true_logits, dtype=torch.float32), labels)
    assert 0 < a < 0.05
    assert 1 / (1 + np.exp(-b)) == pytest.approx(float(labels.mean()), abs=0.05)  # ~ the base rate
    # non-finite logits: the identity, not NaN calibration
    bad = torch.tensor([0.0, float("nan"), 1.0])
    assert pctr._fit_platt(bad, torch.tensor([0.0, 1.0, 1.0])) == (1.0, 0.0)


def test_platt_scaling_on_a_small_separable_split_stays_near_the_click_rate():
    """24 validation rows whose three clicks have the three highest logits: 0/1 targets would give an
    unbounded slope and probabilities of 0 and 1; Platt's targets keep them moderate.
    """
    logits = torch.linspace(-1.0, 1.0, 24)
    labels = (torch.arange(24) >= 21).float()
    a, b = pctr._fit_platt(logits, labels)
    probs = torch.sigmoid(a * logits + b)
    assert a < 20
    assert float(probs.mean()) == pytest.approx(3 / 24, abs=0.03)
    assert float(probs.min()) > 1e-3 and float(probs.max()) < 0.95


def test_category_affinity_learns_which_profiles_click_which_categories(encoder, tmp_path: Path):
    """A profile names its user's tastes in words no ad uses ("clothes and style" for fashion ads
    named by brand): with `pctr.category_affinity` psi learns, across each category's ads, which
    profiles click it; without, only through each ad's own id and rows.
    """
    rng = np.random.default_rng(0)
    tastes = {
        "fashion": "a shopper who likes clothes and style",
        "travel": "a traveller who likes new places",
    }
    brands = [f"{a}{b}" for a in ("nova", "zen", "kiro", "lumo", "tavi") for b in ("ra", "lo", "mek", "sil")]
    ads = pd.DataFrame(
        [(f"{c}-{i}", c, f"{brand} {item}: try it today") for c in tastes for i, (brand, item) in
         enumerate((b, w) for b in brands for w in ("one", "plus", "max"))],
        columns=["ad_id", "category", "ad_text"],
    )  # fmt: skip
    users = pd.DataFrame(
        {"user_id": [f"u{i:03d}" for i in range(200)], "taste": rng.choice(list(tastes), 200)}
    )
    n = 6000
    rows = pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "query": "what should i get",
            "response": "Here is one idea. [1]",
            "position": 1,
            "n_ads": 1,
            "n_same_category": 0,
            "user_id": users["user_id"].to_numpy()[rng.integers(len(users), size=n)],
        }
    )
    ad = ads.iloc[rng.integers(len(ads), size=n)].reset_index(drop=True)
    rows = pd.concat([rows, ad], axis=1)
    taste = rows["user_id"].map(users.set_index("user_id")["taste"])
    rows["profile_text"] = taste.map(tastes)
    liked = (taste == rows["category"]).to_numpy()
    rows["clicked"] = (rng.random(n) < np.where(liked, 0.3, 0.05)).astype(int)
    cfg = PCTRConfig()
    plain = train_pctr(rows, encoder, cfg, seed=0)
    affine = train_pctr(rows, encoder, cfg.model_copy(update={"category_affinity": True}), seed=0)
    assert affine.categories == ["fashion", "travel"] and plain.categories == []
    assert affine.metrics["test"]["auc"] > plain.metrics["test"]["auc"] + 0.05, (
        affine.metrics["test"]["auc"], plain.metrics["test"]["auc"],
    )  # fmt: skip
    # The platform's scoring path (the server's, the pairs'): the category comes with the ad's features.
    user = users.iloc[0]
    picks = [ads[ads["category"] == c].iloc[0] for c in (user["taste"], *(set(tastes) - {user["taste"]}))]
    request = AuctionRequest(
        request_id="scored", user_id=user["user_id"], query="what should i get",
        ads=tuple(AdCandidate(ad_id=a.ad_id, advertiser_id="adv", text=a.ad_text, bid=1.0) for a in picks),
    )  # fmt: skip
    profiles = pd.DataFrame({"user_id": [user["user_id"]], "profile_text": [tastes[user["taste"]]]})
    scored = score_responses(
        affine, encoder, [request] * 2, ["Here is one idea. [AD 1]", "Here is one idea. [AD 2]"],
        table_lookup(profiles, "user_id"), table_lookup(ads, "ad_id"),
    )  # fmt: skip
    assert scored.rewards[0] > 2 * scored.rewards[1]  # the category the profile likes, the same page
    affine.save(tmp_path / "psi")
    loaded = PCTRModel.load(tmp_path / "psi")
    assert loaded.categories == affine.categories
    head = rows.head(50)
    assert np.allclose(loaded.predict(head, encoder), affine.predict(head, encoder), atol=1e-6)
    with pytest.raises(KeyError, match="category"):
        affine.predict(head.drop(columns="category"), encoder)
