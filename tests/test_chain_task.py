"""The variable-chain task: generator against an independent evaluator, tokenizer, first-token evaluation."""

import random
import re
import string

import pytest
import torch
from transformers import AutoTokenizer

from modeling_recurrent.chain_task import (
    SPLITS,
    Problem,
    accuracy_by_hops,
    build_tokenizer,
    chase,
    evaluate_first_token,
    generate_problem,
    sample_problems,
)
from modeling_recurrent.chain_training import substitute_operands

STATEMENT = re.compile(r"([a-z])=(?:(\d)|([a-z])([+-])(\d))")
LITERAL_STATEMENT = re.compile(r"([a-z])=(?:(\d)|([a-z\d])([+-])(\d))")  # an operand may be a substituted digit
PROMPT = re.compile(rf"(?:{STATEMENT.pattern};)+\?[a-z]=")
QUERY = re.compile(r"\?([a-z])=(\d)")
SPEC_EXAMPLE = "d=0;q=b+3;b=9;r=t+7;m=6;t=m-9;g=d-8;?g="
ALPHABET = string.ascii_lowercase + string.digits + "=+-;?"
PROBLEMS_PER_CASE = 100


def parse(statements: list[str], pattern: re.Pattern = STATEMENT) -> dict[str, tuple]:
    """name -> (digit,) or (dependency, sign, digit); every variable assigned once."""
    rules: dict[str, tuple] = {}
    for statement in statements:
        match = pattern.fullmatch(statement)
        assert match, statement
        name, literal, dependency, sign, digit = match.groups()
        assert name not in rules, f"{name} assigned twice"
        rules[name] = (int(literal),) if literal is not None else (dependency, sign, int(digit))
    return rules


def resolve(rules: dict[str, tuple], name: str, seen: frozenset = frozenset()) -> tuple[int, int]:
    """(value mod 10, depth in hops) of `name`, by recursion over the parsed statements."""
    assert name not in seen, f"cycle through {name}"
    rule = rules[name]
    if len(rule) == 1:
        return rule[0], 0
    # A digit operand is a substituted statement (training data with literal operands).
    value, depth = (int(rule[0]), 0) if rule[0].isdigit() else resolve(rules, rule[0], seen | {name})
    return (value + rule[2] if rule[1] == "+" else value - rule[2]) % 10, depth + 1


def evaluate_prompt(prompt: str) -> int:
    *statements, query = prompt.split(";")
    return resolve(parse(statements), QUERY.fullmatch(query + "0").group(1))[0]


def chain_lengths(rules: dict[str, tuple]) -> list[int]:
    """Hops of every chain (a variable nobody depends on ends a chain); asserts the statements form chains."""
    dependencies = [rule[0] for rule in rules.values() if len(rule) == 3]
    assert len(dependencies) == len(set(dependencies)), "a variable feeds two statements"
    return sorted(resolve(rules, name)[1] for name in rules if name not in dependencies)


def test_spec_example():
    assert evaluate_prompt(SPEC_EXAMPLE) == 2


@pytest.mark.parametrize(
    ("split", "hops"), [(name, h) for name, spec in SPLITS.items() for h in range(spec.hops[0], spec.hops[1] + 1)]
)
def test_generator_follows_spec(split, hops):
    spec = SPLITS[split]
    for problem in sample_problems(split, PROBLEMS_PER_CASE, seed=hops, hops=hops):
        assert PROMPT.fullmatch(problem.prompt), problem.prompt
        assert problem.prompt == ";".join(problem.statements) + f";?{problem.target}="
        rules = parse(list(problem.statements))
        assert set(rules) == set(problem.values)
        assert all(rule[0] in rules for rule in rules.values() if len(rule) == 3)
        assert {name: resolve(rules, name)[0] for name in rules} == problem.values
        assert problem.answer == str(evaluate_prompt(problem.prompt))
        assert problem.hops == hops == resolve(rules, problem.target)[1]
        assert problem.chain[-1] == problem.target and len(problem.chain) == hops + 1
        assert len(rules[problem.chain[0]]) == 1
        assert all(rules[b][0] == a for a, b in zip(problem.chain, problem.chain[1:], strict=False))
        distractors = chain_lengths(rules)
        distractors.remove(hops)
        assert spec.n_distractors[0] <= len(distractors) <= spec.n_distractors[1]
        assert all(spec.distractor_hops[0] <= h <= spec.distractor_hops[1] for h in distractors)
        assert len(problem.statements) == hops + 1 + sum(h + 1 for h in distractors)


@pytest.mark.parametrize("split", list(SPLITS))
def test_hops_cover_the_split(split):
    low, high = SPLITS[split].hops
    assert {p.hops for p in sample_problems(split, 300, seed=1)} == set(range(low, high + 1))
    assert max(p.hops for p in sample_problems(split, 100, seed=1, max_hops=low)) == low


def test_seeded_reproducibility():
    assert sample_problems("in-distribution", 50, seed=3) == sample_problems("in-distribution", 50, seed=3)
    assert sample_problems("in-distribution", 50, seed=3) != sample_problems("in-distribution", 50, seed=4)
    assert generate_problem(random.Random(5), 4) == generate_problem(random.Random(5), 4)


@pytest.mark.parametrize(
    "call",
    [
        lambda: generate_problem(random.Random(0), -1),
        lambda: generate_problem(random.Random(0), True),
        lambda: generate_problem(random.Random(0), 20),  # 21 + 2 * 4 variables > 26 letters
        lambda: generate_problem(random.Random(0), 2, n_distractors=(2, 1)),
        lambda: generate_problem(random.Random(0), 2, distractor_hops=(-1, 2)),
        lambda: sample_problems("harder", 5, seed=0, max_hops=3),
        lambda: sample_problems("in-distribution", -1, seed=0),
        lambda: accuracy_by_hops(["1"], []),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_error_messages_name_the_problem():
    with pytest.raises(ValueError, match="hops"):
        generate_problem(random.Random(0), -1)
    with pytest.raises(ValueError, match="in-distribution, harder"):
        sample_problems("hard", 1, seed=0)


def test_tokenizer_round_trips(tmp_path):
    tok = build_tokenizer()
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token, tok.eos_token_id) == ("<pad>", 0, "<|endoftext|>", 1)
    assert len(tok) == len(ALPHABET) + 3
    ids = [tok(c).input_ids for c in ALPHABET]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ALPHABET)
    assert tok.decode([i[0] for i in ids]) == ALPHABET
    assert tok("a b").input_ids == [tok("a").input_ids[0], tok.unk_token_id, tok("b").input_ids[0]]
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (0, 1)
    for problem in [*sample_problems("in-distribution", 50, seed=0), *sample_problems("harder", 50, seed=0)]:
        encoded = tok(problem.prompt).input_ids
        assert len(encoded) == len(problem.prompt)
        assert reloaded(problem.prompt).input_ids == encoded
        assert tok.decode(encoded) == problem.prompt == reloaded.decode(encoded)
        padded = encoded + [tok.eos_token_id, tok.pad_token_id]
        assert reloaded.decode(padded, skip_special_tokens=True) == problem.prompt


def row_text(tok, input_ids: torch.Tensor, mask: torch.Tensor) -> str:
    return tok.decode(input_ids[mask.bool()].tolist(), skip_special_tokens=True)


def test_accuracy_by_hops():
    problems = [Problem("a=1;?a=", "1", 0, ("a=1",), {"a": 1}, "a", ("a",))] * 2
    problems.append(Problem("a=1;b=a+1;?b=", "2", 1, ("a=1", "b=a+1"), {"a": 1, "b": 2}, "b", ("a", "b")))
    assert accuracy_by_hops(["1", "3", "2<|endoftext|>"], problems) == {"accuracy": 2 / 3, "by_hops": {0: 0.5, 1: 1}}


class Oracle(torch.nn.Module):
    """Puts the right answer only at each row's last real position, a wrong digit everywhere else."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def forward(self, input_ids, attention_mask, num_steps):
        assert num_steps == 3
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        logits[..., self.tok.convert_tokens_to_ids("0")] = 1.0
        for row in range(len(input_ids)):
            last = int(attention_mask[row].sum()) - 1
            answer = evaluate_prompt(row_text(self.tok, input_ids[row], attention_mask[row]))
            logits[row, last, self.tok.convert_tokens_to_ids(str(answer))] = 2.0
        return type("Output", (), {"logits": logits})


def test_evaluate_first_token_reads_the_last_prompt_position():
    tok = build_tokenizer()
    result = evaluate_first_token(Oracle(tok), tok, "harder", 20, seed=0, batch_size=8, num_steps=3)
    assert result["accuracy"] == 1.0 and set(result["by_hops"]) <= {7, 8, 9, 10}


def walk(rules: dict[str, tuple], name: str) -> list[str]:
    """`name` and the variables below it, by the parsed statements (the test's own chase)."""
    path = [name]
    while len(rules[path[-1]]) == 3 and not rules[path[-1]][0].isdigit():
        path.append(rules[path[-1]][0])
    return path


def test_chase_follows_the_operands_as_written():
    rng = random.Random(7)
    for problem in sample_problems("in-distribution", 50, seed=8):
        assert chase(problem.statements, problem.target) == list(reversed(problem.chain))
        written = substitute_operands(problem, rng, 0.5)
        rules = parse(list(written), LITERAL_STATEMENT)
        assert all(chase(written, name) == walk(rules, name) for name in problem.values)
    with pytest.raises(ValueError, match="no statement defines 'z'"):
        chase(("a=1",), "z")
