"""Transformer² adaptation: per-group z in the engines, the three first passes, and the second pass."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from svf_rl.cli import main
from svf_rl.engines.hf import HFEngine, Sampling, chat_ids, generate_per_z
from svf_rl.inference.adapt import (
    BASE,
    CEM,
    CLASSIFY_PROMPT,
    Adapter,
    Item,
    check_disjoint,
    classifier_task,
    common_start,
    expert_name,
    mixture,
    named_category,
    read_router,
    split_expert_arg,
)
from svf_rl.inference.evaluate import experts_on_model
from svf_rl.inference.expert import Expert, ExpertError, load_expert, save_expert
from svf_rl.loop.logprobs import TokenBatch, completion_logprobs, make_token_batch
from svf_rl.policies.svf_layer import load_z, svf_layers, z_vectors
from svf_rl.svd import model_fingerprint
from svf_rl.task import Task, load_task
from tests.test_compose_eval import random_expert

GCD = ["reasoning_gym", {"dataset": "gcd", "config": {"min_value": 1, "max_value": 100}, "extract": "last_number"}]
SOURCES = {"arithmetic": ["arithmetic", {}], "gcd": GCD}


def adapter(model_dir, names=("a", "b"), spread=0.5, max_new_tokens=6):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    experts = [random_expert(model_dir, seed, name, spread=spread) for seed, name in enumerate(names)]
    experts = experts_on_model(model, experts, list(names))
    return Adapter(model, tokenizer, dict(zip(names, experts, strict=True)), HFEngine(model, tokenizer),
                   max_new_tokens)


def greedy(adapter_, z, prompts, tokens=6):
    load_z(adapter_.model, z or {n: torch.ones_like(v) for n, v in z_vectors(adapter_.model).items()})
    return [c.ids for c in adapter_.engine.generate(prompts, Sampling(1, 0.0, 1.0, tokens))]


def prompts_of(tokenizer, texts):
    return [chat_ids(tokenizer, [{"role": "user", "content": text}]) for text in texts]


def test_each_group_of_prompts_is_generated_with_its_own_z_and_the_policy_is_restored(sharp_model_dir):
    ad = adapter(sharp_model_dir)
    layers = svf_layers(ad.model)
    policy = {n: 1 + 0.1 * torch.randn(layer.z.shape) for n, layer in layers.items()}
    load_z(ad.model, policy)
    prompts = prompts_of(ad.tokenizer, ["What is 2 + 2?", "Name a colour.", "Spell cat.", "Count to three."])
    groups = [(ad.experts["a"].vectors, prompts[:2]), (None, prompts[2:3]), (ad.experts["b"].vectors, prompts[1:]),
              (policy, [])]
    out = generate_per_z(ad.engine, groups, Sampling(1, 0.0, 1.0, 6))
    assert all(torch.equal(layers[n].z.detach(), policy[n]) for n in layers)  # the policy's z is back
    expected = [greedy(ad, z, p) for z, p in groups[:3]]
    assert [[c.ids for c in group] for group in out[:3]] == expected and out[3] == []
    assert expected[0][1] != greedy(ad, None, prompts[1:2])[0]  # the test can tell the z apart


@pytest.mark.parametrize("n", [1, 2])
def test_a_mixed_batch_runs_each_row_at_its_own_z(sharp_model_dir, n):
    from svf_rl.loop.train import pad_logprobs

    ad = adapter(sharp_model_dir)
    prompts = prompts_of(ad.tokenizer, ["What is 2 + 2?", "Name a colour.", "Spell cat.", "Count to three."])
    groups = [(ad.experts["a"].vectors, prompts[:2]), (None, prompts[2:3]), (ad.experts["b"].vectors, prompts[1:])]
    out = generate_per_z(ad.engine, groups, Sampling(n, 1.0, 1.0, 6), mixed=True)
    assert [len(c) for c in out] == [2 * n, n, 3 * n]
    assert all(layer.row_z is None for layer in svf_layers(ad.model).values())
    for (z, _), completions in zip(groups, out, strict=True):
        load_z(ad.model, z or {k: torch.ones_like(v) for k, v in z_vectors(ad.model).items()})
        batch = make_token_batch([c.prompt_ids for c in completions], [c.ids for c in completions],
                                 ad.tokenizer.pad_token_id)
        ours = completion_logprobs(ad.model, batch)
        served = pad_logprobs([c.logprobs for c in completions], ours.shape[1])
        assert ((served - ours).abs() * batch.completion_mask).max().item() < 1e-4  # the sampler's own z


def test_the_second_pass_batches_by_route_and_gives_each_prompt_its_routes_answer(sharp_model_dir):
    ad = adapter(sharp_model_dir)
    task = load_task("arithmetic", {})
    items = [Item(task, row, "a") for row in task.rows("test", 6, 0)]
    routes = ["a", BASE, "b", "a", "b", BASE]
    zs = {BASE: None, "a": ad.experts["a"].vectors, "b": ad.experts["b"].vectors}
    completions, scores, cost = ad.answer(items, routes, zs)
    for route in zs:
        alone = [item for item, r in zip(items, routes, strict=True) if r == route]
        expected, _, _ = ad.answer(alone, [route] * len(alone), zs)
        assert [c.ids for c, r in zip(completions, routes, strict=True) if r == route] == [c.ids for c in expected]
    assert len(scores) == 6 and cost.tokens == sum(len(c.prompt_ids) + len(c.ids) for c in completions)


def test_an_answer_names_one_category_or_goes_to_the_base_model():
    names = ["math", "code"]
    assert named_category("\\boxed{code}", names) == "code" and named_category("Math.", names) == "math"
    assert named_category("It is \\boxed{Math}.", names) == "math"
    assert named_category("\\boxed{math} or maybe code", names) == "math"  # the box decides
    for text in ("\\boxed{other (not math)}", "Other. Definitely not code.", "This is a code question, not math.",
                 "\\boxed{math or code}", "\\boxed{poetry} though math is close", "\\boxed{other}", "no idea",
                 "mathematics", ""):
        assert named_category(text, names) == BASE, text


def test_the_prompt_strategy_routes_each_prompt_and_reports_its_cost(sharp_model_dir):
    ad = adapter(sharp_model_dir, names=("math", "code"))
    task = load_task("arithmetic", {})
    items = [Item(task, row, "math") for row in task.rows("test", 3, 0)]
    result = ad.run("prompt", items)
    assert all(r in ("math", "code", BASE) for r in result.routes) and result.first.tokens > 0
    report = result.report(items)
    assert set(report) >= {"accuracy", "accuracy_low", "first_to_second_time", "routed_to_own_expert"}


def test_routers_score_each_label_in_one_forward_as_a_full_forward_would(sharp_model_dir):
    ad = adapter(sharp_model_dir, names=("math", "code"))
    policy = {n: 1 + 0.2 * torch.randn(v.shape) for n, v in z_vectors(ad.model).items()}
    load_z(ad.model, policy)  # the routers must not read with the policy's z
    task = load_task("arithmetic", {})
    items = [Item(task, row, "math") for row in task.rows("test", 5, 0)]
    routes, cost = ad.route_by_prompt(items)
    labels = ["math", "code", "other"]
    prompts = [chat_ids(ad.tokenizer, [{"role": "user", "content": CLASSIFY_PROMPT.format(
        options="- math\n- code", question=item.question())}]) for item in items]
    answers = [ad.tokenizer.encode(f"\\boxed{{{label}}}", add_special_tokens=False) for label in labels]
    load_z(ad.model, {n: torch.ones_like(v) for n, v in policy.items()})
    full = torch.tensor([[(completion_logprobs(ad.model, make_token_batch([p], [a], ad.tokenizer.pad_token_id))
                           .sum().item()) for a in answers] for p in prompts])
    torch.testing.assert_close(ad.answer_logprobs(prompts, answers), full, rtol=0, atol=1e-4)
    for raw in ([[5, 6, 7], [8, 9]], [[5, 6, 7], [5, 6, 9, 4]], [[5], [5, 6]]):  # no, some, all but one shared
        expected = torch.tensor([[completion_logprobs(ad.model, make_token_batch([p], [a], ad.tokenizer.pad_token_id))
                                  .sum().item() for a in ([10], [11, 12, 13])] for p in raw])
        torch.testing.assert_close(ad.answer_logprobs(raw, [[10], [11, 12, 13]], chunk=1), expected, rtol=0,
                                   atol=1e-4)
    assert routes == [BASE if labels[i] == "other" else labels[i] for i in full.argmax(1).tolist()]
    shared = common_start(prompts)  # the instructions, read once
    assert 0 < shared < min(map(len, prompts)) and cost.seconds > 0
    assert cost.tokens == shared + sum(len(p) - shared for p in prompts) + len(prompts) * sum(map(len, answers))
    load_z(ad.model, policy)
    ad.first_pass = "generate"
    generated, _ = ad.route_by_prompt(items)
    assert all(torch.equal(z_vectors(ad.model)[n], policy[n]) for n in policy) and len(generated) == 5


def test_the_first_pass_reads_the_start_of_a_long_prompt(sharp_model_dir):
    ad = adapter(sharp_model_dir)
    ad.first_pass_tokens = 8
    long = "Count the letters in " + " ".join(["banana"] * 200)
    short = ad._shortened(long)
    assert len(ad.tokenizer.encode(short.removesuffix(" ..."), add_special_tokens=False)) <= 9
    assert short.startswith("Count the letters") and ad._shortened("What is 2 + 2?") == "What is 2 + 2?"


def test_an_expert_named_like_a_strategy_or_route_is_refused(sharp_model_dir):
    for name in ("prompt", "few-shot", "classifier", "oracle", "base", "other"):
        with pytest.raises(ExpertError, match=repr(name)):
            adapter(sharp_model_dir, names=(name, "b"))


def test_paths_with_an_equals_sign_are_paths(tmp_path):
    assert split_expert_arg("runs/lr=1/expert.safetensors") == ("lr=1", "runs/lr=1/expert.safetensors")
    assert split_expert_arg("fast=runs/lr=1/expert.safetensors") == ("fast", "runs/lr=1/expert.safetensors")
    (tmp_path / "a=b.safetensors").write_text("")
    assert split_expert_arg(str(tmp_path / "a=b.safetensors"))[1] == str(tmp_path / "a=b.safetensors")


def test_a_classifier_trained_on_evaluated_prompts_is_refused(sharp_model_dir):
    sources = {"a": SOURCES["arithmetic"], "b": GCD}
    classifier = Expert({}, "m", "f", "mlp", "task_classification",
                        {"task": "task_classification", "task_args": {"sources": sources}, "train_size": 60,
                         "seed": 0})
    task = classifier_task(classifier, ["a", "b"])
    arithmetic = load_task("arithmetic", {})
    train_items = [Item(arithmetic, row, "a") for row in arithmetic.rows("train", 30, 0)]
    with pytest.raises(ExpertError, match="classifier's training problems"):
        check_disjoint(classifier, task, train_items)
    check_disjoint(classifier, task, [Item(arithmetic, row, "a") for row in arithmetic.rows("test", 30, 0)])
    # Sources that put another instruction around the same problems: the problems are compared, not the text.
    reworded = {"a": ["arithmetic", {"instruction": "Reply with the number only.", "system_prompt": "Be terse."}],
                "b": GCD}
    classifier.config["task_args"] = {"sources": reworded}
    with pytest.raises(ExpertError, match="30 of the 30 evaluated problems"):
        check_disjoint(classifier, classifier_task(classifier, ["a", "b"]), train_items)
    with pytest.raises(ExpertError, match="not the categories"):
        classifier_task(classifier, ["a", "poetry"])


def reproduce_task(ad, target, rows):
    """Reward 1 for reproducing the target expert's greedy answer: the best α is known (that expert alone)."""
    prompts = prompts_of(ad.tokenizer, [row["q"] for row in rows])
    answers = greedy(ad, ad.experts[target].vectors, prompts, tokens=1)

    class Reproduce(Task):
        name = "reproduce"

        def user_message(self, row):
            return row["q"]

        def score(self, completion, row):
            return float(completion == row["answer"])

    for row, ids in zip(rows, answers, strict=True):
        row["answer"] = ad.tokenizer.decode(ids, skip_special_tokens=True)
    return Reproduce()


@pytest.mark.parametrize("per_layer", [False, True])
def test_few_shot_search_moves_towards_the_mixture_that_scores_best(sharp_model_dir, per_layer):
    ad = adapter(sharp_model_dir, names=("a", "b"), spread=0.8)
    rows = [{"q": q} for q in ("Name a colour.", "What is 3 + 4?", "Say hi.", "Spell dog.", "Count to two.",
                               "Pick a number.", "Is it raining?", "Write one word.")]
    task = reproduce_task(ad, "b", rows)  # the best α is (0, 1): expert b alone
    shots = [Item(task, row, "b") for row in rows]
    uniform = greedy(ad, ad.mix(torch.full((2,), 0.5)), prompts_of(ad.tokenizer, [r["q"] for r in rows]), 1)
    start = sum(task.score(ad.tokenizer.decode(ids, skip_special_tokens=True), row)
                for ids, row in zip(uniform, rows, strict=True)) / len(rows)
    alpha, trace, cost = ad.search_alpha(shots, CEM(population=16, iterations=10, per_layer=per_layer), 1)
    kept = [step["kept_score"] for step in trace]
    assert kept == sorted(kept) and kept[-1] == max(step["best_score"] for step in trace)  # never lost
    assert kept[-1] > start and cost.tokens > 0 and cost.seconds > 0
    assert alpha.shape == ((len(ad.modules), 2) if per_layer else (2,)) and ((0 <= alpha) & (alpha <= 1)).all()
    assert kept[0] == 1.0  # the first population holds each expert alone, b among them
    assert alpha.reshape(-1, 2)[:, 1].mean() > alpha.reshape(-1, 2)[:, 0].mean()
    mean = trace[-1]["alpha_mean"]  # the search distribution follows the best candidates, not the worst
    assert mean[1] > mean[0] + 0.2 and trace[-1]["mean_score"] > trace[0]["mean_score"]


class Anything(Task):  # every answer is correct: only the likelihood tells candidates apart
    name = "anything"

    def user_message(self, row):
        return row["q"]

    def score(self, completion, row):
        return 1.0


def anything_shots():
    return [Item(Anything(), {"q": q}, "a") for q in ("Name a colour.", "What is 3 + 4?", "Say hi.")]


def test_equal_scores_go_to_the_alpha_under_which_correct_answers_are_likelier(sharp_model_dir):
    ad = adapter(sharp_model_dir)
    rows = [item.row for item in anything_shots()]
    cem = CEM(population=6, iterations=1, seed=3)
    alpha, trace, _ = ad.search_alpha(anything_shots(), cem, 5)
    candidates = (torch.full((2,), 0.5) + 0.5 * torch.randn((6, 2), generator=torch.Generator().manual_seed(3))
                  ).clamp(0, 1)
    candidates[:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # each expert alone, and their mean
    prompts = prompts_of(ad.tokenizer, [r["q"] for r in rows])
    pooled = {(tuple(p), tuple(ids)) for a in candidates for p, ids in zip(prompts, greedy(ad, ad.mix(a), prompts, 5),
                                                                        strict=True)}
    likelihoods = [ad.likelihood(a, [(list(p), list(c)) for p, c in pooled]) for a in candidates]
    assert torch.equal(alpha, candidates[max(range(6), key=likelihoods.__getitem__)])
    assert len(set(likelihoods)) == 6  # the candidates do differ


def test_over_iterations_the_likeliest_of_equal_scores_is_kept_and_every_forward_is_counted(sharp_model_dir,
                                                                                            monkeypatch):
    ad = adapter(sharp_model_dir)
    calls, generated = [], []
    real_likelihood, real_generate = ad.likelihood, ad.engine.generate

    def likelihood(alpha, pooled):
        value = real_likelihood(alpha, pooled)
        calls.append((alpha.clone(), [(tuple(p), tuple(c)) for p, c in pooled], value))
        return value

    def generate(prompts, sampling):
        out = real_generate(prompts, sampling)
        generated.extend(out)
        return out

    monkeypatch.setattr(ad, "likelihood", likelihood)
    monkeypatch.setattr(ad.engine, "generate", generate)
    alpha, trace, cost = ad.search_alpha(anything_shots(), CEM(population=6, iterations=4, seed=5), 5)
    final = [(a, value) for a, pool, value in calls if pool == calls[-1][1]]
    assert len(final) > 6 and torch.equal(alpha, max(final, key=lambda c: c[1])[0])  # over every candidate
    forwards = sum(len(p) + len(c) for _, pool, _ in calls for p, c in pool)
    assert cost.tokens == sum(len(c.prompt_ids) + len(c.ids) for c in generated) + forwards


def test_likelihoods_run_on_the_models_device(sharp_model_dir, monkeypatch):
    ad = adapter(sharp_model_dir)
    moved, to = [], TokenBatch.to
    monkeypatch.setattr(TokenBatch, "to", lambda batch, device: (moved.append(device), to(batch, device))[1])
    prompt = prompts_of(ad.tokenizer, ["Say hi."])[0]
    ad.likelihood(torch.tensor([0.5, 0.5]), [(prompt, [5, 6, 7])])
    assert moved == [next(ad.model.parameters()).device]


def test_a_search_that_fails_leaves_the_model_and_its_engine_on_the_policy(sharp_model_dir, monkeypatch):
    ad = adapter(sharp_model_dir)
    policy = {n: 1 + 0.05 * torch.randn(v.shape) for n, v in z_vectors(ad.model).items()}
    load_z(ad.model, policy)
    pushed = []
    monkeypatch.setattr(ad.engine, "update_weights", lambda: pushed.append(z_vectors(ad.model)))

    def interrupted(alpha, pooled):
        load_z(ad.model, ad.mix(alpha))
        raise KeyboardInterrupt

    monkeypatch.setattr(ad, "likelihood", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ad.search_alpha(anything_shots(), CEM(population=4, iterations=2), 3)
    assert all(torch.equal(z_vectors(ad.model)[n], policy[n]) for n in policy)
    assert all(torch.equal(pushed[-1][n], policy[n]) for n in policy)  # what the engine was given last


def test_experts_load_onto_one_model_twice(sharp_model_dir):
    model = AutoModelForCausalLM.from_pretrained(sharp_model_dir).eval()
    first = experts_on_model(model, [random_expert(sharp_model_dir, 0, "a")], ["a"])
    again = experts_on_model(model, [random_expert(sharp_model_dir, 1, "b")], ["b"])
    assert first[0].vectors.keys() == again[0].vectors.keys()
    other = random_expert(sharp_model_dir, 1, "b")
    other.base_fingerprint = "0" * 32
    with pytest.raises(ExpertError, match="fingerprint"):
        experts_on_model(model, [other], ["c"])


def test_expert_names_come_from_the_run_directory_or_are_given():
    assert expert_name("runs/gcd/expert.safetensors") == "gcd"
    assert expert_name("math=x/y.safetensors") == "math" and expert_name("z/code.safetensors") == "code"


def write_expert(model_dir, path, seed, task, task_args, **config):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    expert = random_expert(model_dir, seed, task)
    expert.config = {"task": task, "task_args": task_args, "max_new_tokens": 4, **config}
    expert.base_fingerprint = model_fingerprint(model)
    return str(save_expert(expert, path))


def test_adapt_command_runs_every_strategy_on_the_experts_tasks(sharp_model_dir, tmp_path, capsys):
    a = write_expert(sharp_model_dir, tmp_path / "arith" / "expert.safetensors", 0, "arithmetic", {})
    b = write_expert(sharp_model_dir, tmp_path / "gcd.safetensors", 1, *GCD)
    classifier = write_expert(sharp_model_dir, tmp_path / "cls.safetensors", 2, "task_classification",
                              {"sources": {"arith": SOURCES["arithmetic"], "gcd": GCD}}, train_size=50)
    common = [a, b, "--model", sharp_model_dir, "--size", "3"]
    for strategy, extra in [("oracle", []), ("prompt", ["--describe", "arith=sums", "gcd=divisors"]),
                            ("classifier", ["--classifier", classifier]),
                            ("few-shot", ["--shots", "2", "--population", "4", "--iterations", "2"]),
                            ("gcd", [])]:
        out = tmp_path / f"{strategy}.json"
        assert main(["adapt", *common, "--strategy", strategy, "--output", str(out), *extra]) == 0, strategy
        result = json.loads(out.read_text())
        assert result["n"] == 6 and result["per_task"].keys() == {"arith", "gcd"}
        assert len(result["completions"]) == 6
        if strategy == "oracle":
            assert result["routed_to_own_expert"] == 1.0
        if strategy == "few-shot":
            assert set(result["alphas"]) == {"arith", "gcd"} and result["first_pass_seconds"] > 0
    for first_pass in ("score", "generate"):  # both routers' ways of reading their answer
        out = tmp_path / f"classifier_{first_pass}.json"
        assert main(["adapt", *common, "--strategy", "classifier", "--classifier", classifier, "--first-pass",
                     first_pass, "-o", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["first_pass"] == first_pass and set(result["recall"]) == {"arith", "gcd"}
    assert main(["adapt", *common, "--strategy", "classifier", "--classifier", classifier, "--split", "train"]) == 2
    assert "classifier's training problems" in capsys.readouterr().err
    assert main(["adapt", *common, "--strategy", "few-shot", "--shot-split", "test"]) == 2
    assert main(["adapt", a, a, "--strategy", "oracle"]) == 2  # two experts of one name


def test_the_mixture_holds_each_tasks_distinct_problems():
    tasks = {"arith": load_task("arithmetic", {}), "gcd": load_task(*GCD)}
    items = mixture(tasks, "test", 5, 0)
    assert [i.category for i in items] == ["arith"] * 5 + ["gcd"] * 5
    assert len({i.question() for i in items}) == 10


def test_adapt_answers_your_own_prompts_and_keeps_the_alpha_it_finds(sharp_model_dir, tmp_path, capsys):
    a = write_expert(sharp_model_dir, tmp_path / "arith" / "expert.safetensors", 0, "arithmetic", {})
    b = write_expert(sharp_model_dir, tmp_path / "gcd.safetensors", 1, *GCD)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 2?", "id": 7}) + "\n\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "GCD of 4 and 6?"}]}))
    common = [a, b, "--model", sharp_model_dir, "--prompts", str(prompts)]
    out = tmp_path / "answers.jsonl"
    assert main(["adapt", *common, "--strategy", "prompt", "-o", str(out)]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 2 and answers[0]["id"] == 7 and answers[1]["messages"][0]["content"] == "Be brief."
    assert all(x["route"] in ("arith", "gcd", BASE) and isinstance(x["answer"], str) for x in answers)
    assert main(["adapt", *common, "--strategy", "gcd", "-o", str(tmp_path / "gcd.jsonl")]) == 0
    assert {json.loads(x)["route"] for x in (tmp_path / "gcd.jsonl").read_text().splitlines()} == {"gcd"}

    # few-shot: one α for every prompt, searched on the experts' own tasks, kept as an expert and as compose's
    # --alpha-file; the answers are that expert's own
    kept, out = tmp_path / "found", tmp_path / "few.jsonl"
    assert main(["adapt", *common, "--strategy", "few-shot", "--shots", "2", "--population", "4", "--iterations",
                 "2", "--per-layer", "--mixing", "anchored", "--save-experts", str(kept), "-o", str(out)]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert {x["route"] for x in answers} == {"mixture"} and len(answers[0]["alpha"]) > 1
    found = load_expert(kept / "mixture.safetensors")
    assert found.config["composition"]["mixing"] == "anchored"
    assert main(["compose", a, b, "--alpha-file", str(kept / "mixture.alpha.json"), "--mixing", "anchored", "-o",
                 str(tmp_path / "again.safetensors")]) == 0
    again = load_expert(tmp_path / "again.safetensors")
    assert all(torch.allclose(again.vectors[m], found.vectors[m], rtol=0, atol=1e-6) for m in found.vectors)
    ad = adapter(sharp_model_dir, names=("arith", "gcd"), max_new_tokens=4)
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line]
    from svf_rl.inference.adapt import UserPrompts

    expected = greedy(ad, found.vectors, [chat_ids(ad.tokenizer, UserPrompts().prompt(r)) for r in rows], 4)
    assert [x["answer"] for x in answers] == [ad.tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]

    capsys.readouterr()
    assert main(["adapt", *common, "--strategy", "oracle"]) == 2 and "task" in capsys.readouterr().err
    assert main(["adapt", *common, "--strategy", "prompt", "--save-experts", str(kept)]) == 2
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["adapt", a, b, "--strategy", "prompt", "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 2" in capsys.readouterr().err


def sequence_mixture(model_dir, experts, path, seed=0):
    """A mixture file with a sequence router over `experts` (random, so that prompts are routed apart, and a
    random centre, which the file must carry)."""
    from svf_rl.config import load_config
    from svf_rl.policies import make_policy

    config = load_config(None, ["policy=mixture", "targets=mlp", f"model={model_dir}",
                                f"policy_args.experts=[{','.join(experts)}]", "policy_args.routing=sequence"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    fingerprint = model_fingerprint(model)
    policy = make_policy(config)
    policy.attach(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        policy.router.weight.normal_(0, 2.0)
    policy.set_centre(torch.randn(policy.router.centre.shape))
    return policy.save(path, {"model": model_dir, "fingerprint": fingerprint, "task": "mixed", "config": {}}, {})


def test_the_router_strategy_answers_as_the_trained_sequence_mixture_does(sharp_model_dir, tmp_path, capsys):
    from svf_rl.policies.routing import routed_model

    a = write_expert(sharp_model_dir, tmp_path / "arith" / "expert.safetensors", 0, "arithmetic", {})
    b = write_expert(sharp_model_dir, tmp_path / "gcd.safetensors", 1, *GCD)
    mix = sequence_mixture(sharp_model_dir, [a, b], tmp_path / "mix.safetensors")
    common = [a, b, "--model", sharp_model_dir, "--size", "3", "--strategy", "router"]
    out = tmp_path / "router.json"
    assert main(["adapt", *common, "--router", str(mix), "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 6 and set(result["mean_gates"]) == {"arith", "gcd"} and set(result["recall"]) == {
        "arith", "gcd"} and result["first_pass_tokens"] > 0
    assert all(sum(g) == pytest.approx(1.0) for g in result["mean_gates"].values())
    # Its first pass and second are the mixture's own: the file's routed model, greedy, on the same prompts
    model, tokenizer, _ = routed_model(mix, sharp_model_dir)
    first = read_router(mix, {"arith": Path(a), "gcd": Path(b)}, load_expert(a).base_fingerprint).router
    assert first.centre.any() and torch.equal(first.centre, model.sequence_router.centre)
    items = mixture({"arith": load_task("arithmetic", {}), "gcd": load_task(*GCD)}, "test", 3, 0)
    prompts = [chat_ids(tokenizer, item.task.prompt(item.row)) for item in items]
    want = HFEngine(model, tokenizer).generate(prompts, Sampling(1, 0.0, 1.0, result["max_new_tokens"]))
    assert [c["completion"] for c in result["completions"]] == [c.text for c in want]
    assert len({c.text for c in want}) > 1
    # Refused in one line: no router, a router elsewhere, other experts, a token-routed file, vLLM
    other = write_expert(sharp_model_dir, tmp_path / "arith2.safetensors", 3, "arithmetic", {})
    token = tmp_path / "token.safetensors"
    from svf_rl.config import load_config
    from svf_rl.policies import make_policy

    policy = make_policy(load_config(None, ["policy=mixture", "targets=mlp", f"policy_args.experts=[{a},{b}]"]))
    policy.attach(AutoModelForCausalLM.from_pretrained(sharp_model_dir))
    policy.save(token, {"model": sharp_model_dir, "fingerprint": load_expert(a).base_fingerprint, "task": "mixed",
                        "config": {}}, {})
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(mix), "pt") as f:  # a router whose centre does not fit its weights
        bad = {k: f.get_tensor(k) for k in f.keys()} | {"sequence_router.centre": torch.zeros(3)}
        save_file(bad, str(tmp_path / "bad.safetensors"), f.metadata())
    capsys.readouterr()
    for args, message in [(common, "needs --router"),
                          ([*common, "--router", str(tmp_path / "bad.safetensors")], "router centre has shape"),
                          ([a, b, "--strategy", "oracle", "--router", str(mix)], "used only by --strategy router"),
                          ([a, other, *common[2:], "--router", str(mix)], "not among the experts given"),
                          ([*common, "--router", str(token)], "routing='token'"),
                          ([*common, "--router", str(mix), "--engine", "vllm"], "only the HF engine")]:
        assert main(["adapt", *args]) == 2, message
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
