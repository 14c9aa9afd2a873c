"""Transformer² adaptation: per-group z in the engines, the three first passes, and the second pass."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from svf_rl.cli import main
from svf_rl.engines.hf import HFEngine, Sampling, chat_ids, generate_per_z
from svf_rl.inference.adapt import BASE, CEM, Adapter, Item, check_disjoint, classifier_task, expert_name, mixture
from svf_rl.inference.evaluate import experts_on_model
from svf_rl.inference.expert import Expert, ExpertError, save_expert
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


def test_the_prompt_strategy_reads_the_category_and_sends_anything_else_to_the_base_model(sharp_model_dir):
    ad = adapter(sharp_model_dir, names=("math", "code"))
    assert ad.category("\\boxed{code}") == "code"
    assert ad.category("It is \\boxed{Math}.") == "math"
    assert ad.category("\\boxed{poetry} though math is close") == BASE  # the box decides
    assert ad.category("This is a code question, not math.") == "code"  # no box: the first named
    assert ad.category("\\boxed{other}") == BASE and ad.category("no idea") == BASE
    task = load_task("arithmetic", {})
    items = [Item(task, row, "math") for row in task.rows("test", 3, 0)]
    result = ad.run("prompt", items)
    assert all(r in ("math", "code", BASE) for r in result.routes) and result.first.tokens > 0
    report = result.report(items)
    assert set(report) >= {"accuracy", "accuracy_low", "first_to_second_time", "routed_to_own_expert"}


def test_a_classifier_trained_on_evaluated_prompts_is_refused(sharp_model_dir):
    sources = {"a": SOURCES["arithmetic"], "b": GCD}
    classifier = Expert({}, "m", "f", "mlp", "task_classification",
                        {"task": "task_classification", "task_args": {"sources": sources}, "train_size": 60,
                         "seed": 0})
    task = classifier_task(classifier, ["a", "b"])
    arithmetic = load_task("arithmetic", {})
    train_items = [Item(arithmetic, row, "a") for row in arithmetic.rows("train", 30, 0)]
    with pytest.raises(ExpertError, match="classifier's training prompts"):
        check_disjoint(classifier, task, train_items)
    check_disjoint(classifier, task, [Item(arithmetic, row, "a") for row in arithmetic.rows("test", 30, 0)])
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


def test_equal_scores_go_to_the_alpha_under_which_correct_answers_are_likelier(sharp_model_dir):
    ad = adapter(sharp_model_dir)

    class Anything(Task):  # every answer is correct: only the likelihood tells candidates apart
        name = "anything"

        def user_message(self, row):
            return row["q"]

        def score(self, completion, row):
            return 1.0

    rows = [{"q": q} for q in ("Name a colour.", "What is 3 + 4?", "Say hi.")]
    cem = CEM(population=6, iterations=1, seed=3)
    alpha, trace, _ = ad.search_alpha([Item(Anything(), row, "a") for row in rows], cem, 5)
    candidates = (torch.full((2,), 0.5) + 0.5 * torch.randn((6, 2), generator=torch.Generator().manual_seed(3))
                  ).clamp(0, 1)
    candidates[:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # each expert alone, and their mean
    prompts = prompts_of(ad.tokenizer, [r["q"] for r in rows])
    pooled = {(tuple(p), tuple(ids)) for a in candidates for p, ids in zip(prompts, greedy(ad, ad.mix(a), prompts, 5),
                                                                        strict=True)}
    likelihoods = [ad.likelihood(a, [(list(p), list(c)) for p, c in pooled]) for a in candidates]
    assert torch.equal(alpha, candidates[max(range(6), key=likelihoods.__getitem__)])
    assert len(set(likelihoods)) == 6  # the candidates do differ


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
    assert main(["adapt", *common, "--strategy", "classifier", "--classifier", classifier, "--split", "train"]) == 2
    assert "classifier's training prompts" in capsys.readouterr().err
    assert main(["adapt", *common, "--strategy", "few-shot", "--shot-split", "test"]) == 2
    assert main(["adapt", a, a, "--strategy", "oracle"]) == 2  # two experts of one name


def test_the_mixture_holds_each_tasks_distinct_problems():
    tasks = {"arith": load_task("arithmetic", {}), "gcd": load_task(*GCD)}
    items = mixture(tasks, "test", 5, 0)
    assert [i.category for i in items] == ["arith"] * 5 + ["gcd"] * 5
    assert len({i.question() for i in items}) == 10
