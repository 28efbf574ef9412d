"""Training batches of the chain task: every option's labels checked against an independent evaluator."""

import random
import string

import pytest
import torch

from modeling_recurrent.chain_task import build_tokenizer, generate_problem, sample_problems
from modeling_recurrent.chain_training import (
    ChainBatches,
    ChainOptions,
    carry_inputs,
    chain_order,
    paced_labels,
    paced_targets,
    read_digits,
    resolved_statement_targets,
    substitute_operands,
    training_batch,
    training_example,
)

from .test_chain_task import (
    LITERAL_STATEMENT,
    PROMPT,
    QUERY,
    SPEC_EXAMPLE,
    chain_lengths,
    evaluate_prompt,
    parse,
    resolve,
    row_text,
    walk,
)


@pytest.mark.parametrize(
    "call",
    [
        lambda: training_example(sample_problems("harder", 1, seed=0)[0], random.Random(0), 0),
        lambda: training_batch(build_tokenizer(), random.Random(0), 0),
        lambda: training_batch(build_tokenizer(), random.Random(0), 2, hops=(3, 1)),
        lambda: training_batch(build_tokenizer(), random.Random(0), 2, hop_weights=[1, -1]),
        lambda: training_batch(build_tokenizer(), random.Random(0), 2, (0, 1), hop_weights=[1]),
        lambda: ChainOptions(n_queries=0),
        lambda: ChainOptions(n_repeats=-1),
        lambda: ChainOptions(backward=1.5),
        lambda: ChainOptions(paced=True, paced_offsets=-0.1),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def check_training_text(text: str, positions: list[int]) -> list[str]:
    """Asserts the queries are answered correctly at `positions`; returns the queried variables."""
    statements = [s for s in text.split(";") if not s.startswith("?")]
    queries = text.split(";")[len(statements) :]
    assert queries and all(QUERY.fullmatch(q) for q in queries), text
    rules = parse(statements)
    names = [QUERY.fullmatch(q).group(1) for q in queries]
    assert len(set(names)) == len(names)
    assert [text[i] for i in positions] == [q[-1] for q in queries]
    assert all(int(q[-1]) == resolve(rules, name)[0] for q, name in zip(queries, names, strict=True))
    return names


def test_training_example():
    rng = random.Random(0)
    first_is_target = 0
    for problem in sample_problems("in-distribution", 200, seed=2):
        assert training_example(problem, rng, 1) == (problem.prompt + problem.answer, [len(problem.prompt)])
        text, positions = training_example(problem, rng, 4)
        names = check_training_text(text, positions)
        assert problem.target in names and len(names) == min(4, len(problem.values))
        first_is_target += names[0] == problem.target
        text, positions = training_example(problem, rng, 30)  # capped at the number of variables
        assert sorted(check_training_text(text, positions)) == sorted(problem.values)
    assert 0 < first_is_target < 200


def test_training_batches():
    tok = build_tokenizer()
    batch = training_batch(tok, random.Random(0), 16, (0, 6), ChainOptions(n_queries=3))
    assert {k: (v.dtype, v.shape[0]) for k, v in batch.items()} == dict.fromkeys(batch, (torch.long, 16))
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (input_ids[mask == 0] == tok.pad_token_id).all()
    assert (mask[:, :-1] >= mask[:, 1:]).all() and (mask[:, 0] == 1).all()  # right padding
    for row in range(16):
        length = int(mask[row].sum())
        assert input_ids[row, length - 1] == tok.eos_token_id
        text = row_text(tok, input_ids[row], mask[row])
        assert tok(text).input_ids == input_ids[row, : length - 1].tolist()
        supervised = (labels[row] != -100).nonzero().flatten().tolist()
        assert supervised[-1] == length - 1
        assert (labels[row, supervised] == input_ids[row, supervised]).all()
        n_variables = sum(not s.startswith("?") for s in text.split(";"))
        assert len(check_training_text(text, supervised[:-1])) == len(supervised) - 1 == min(3, n_variables)


def max_depth(tok, batch: dict) -> list[int]:
    texts = [row_text(tok, i, m) for i, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    return [max(chain_lengths(parse([s for s in t.split(";") if not s.startswith("?")]))) for t in texts]


def test_hop_selection_and_reproducibility():
    tok = build_tokenizer()
    assert set(max_depth(tok, training_batch(tok, random.Random(0), 32, (5, 5)))) == {5}
    assert set(max_depth(tok, training_batch(tok, random.Random(0), 32, hop_weights=[0] * 8 + [1]))) == {8}
    assert max(max_depth(tok, training_batch(tok, random.Random(0), 32, hop_weights=[1]))) <= 3
    batches = ChainBatches(tok, seed=7, batch_size=8, options=ChainOptions(n_queries=2))
    first, second = next(batches), next(batches)
    assert all(
        torch.equal(first[k], ChainBatches(tok, 7, 8, options=ChainOptions(n_queries=2)).batch(0)[k]) for k in first
    )
    assert not torch.equal(first["input_ids"][:, :8], second["input_ids"][:, :8])
    one_query = ChainBatches(tok, seed=7, batch_size=4, options=ChainOptions(n_queries=1)).batch(0)
    assert ((one_query["labels"] != -100).sum(1) == 2).all()  # the answer and the eos
    rich = ChainBatches(tok, 7, 8, (0, 2), ChainOptions(n_queries=5, n_repeats=3, literal_operands=0.5)).batch(3)
    same = training_batch(
        tok, random.Random("7-3"), 8, (0, 2), ChainOptions(n_queries=5, n_repeats=3, literal_operands=0.5)
    )
    assert all(torch.equal(rich[k], same[k]) for k in rich)  # the trainer's stream, reproducible by hand


def test_repeated_statements_supervise_what_follows_the_variable():
    problem = generate_problem(random.Random(5), 3)
    text, positions = training_example(problem, random.Random(6), n_queries=2, n_repeats=2)
    body = ";".join(problem.statements)
    repeated = text[len(body) + 1 :].split(";?")[0].split(";")
    assert len(repeated) == 2 and all(r in problem.statements for r in repeated)
    supervised = "".join(text[i] for i in positions)
    assert supervised.startswith("".join(r[1:] for r in repeated))  # e.g. "=9" and "=b+3": not the variable names
    assert len(positions) == sum(len(r) - 1 for r in repeated) + 2
    with pytest.raises(ValueError, match="n_repeats"):
        training_example(problem, random.Random(0), 1, -1)


def test_literal_operands_keep_every_value():
    substituted = 0
    for problem in sample_problems("in-distribution", 100, seed=3):
        rng = random.Random(0)
        assert substitute_operands(problem, rng, 0) == problem.statements
        assert rng.random() == random.Random(0).random()  # nothing drawn: old data streams unchanged
        everything = parse(list(substitute_operands(problem, rng, 1.0)), LITERAL_STATEMENT)
        assert all(len(rule) == 1 or rule[0].isdigit() for rule in everything.values())
        text, positions = training_example(problem, rng, 30, 3, literal_operands=0.5)
        statements = text.split(";?")[0].split(";")[: len(problem.statements)]
        rules = parse(statements, LITERAL_STATEMENT)
        assert {name: resolve(rules, name)[0] for name in rules} == problem.values
        substituted += sum(len(rule) == 3 and rule[0].isdigit() for rule in rules.values())
        assert [text[i] for i in positions[-len(problem.values) :]] == [q[-1] for q in text.split(";?")[1:]]
    assert substituted > 50
    with pytest.raises(ValueError, match="probability"):
        substitute_operands(sample_problems("harder", 1, seed=0)[0], random.Random(0), 1.5)


def written_statements(text: str) -> list[str]:
    """The problem's statements at the start of a training text: they end where a query or a repeated variable
    begins."""
    statements = []
    for part in text.split(";"):
        if part.startswith("?") or part[0] in {s[0] for s in statements}:
            break
        statements.append(part)
    return statements


def test_statement_values_supervise_what_the_text_so_far_determines():
    tok, rng, resolved = build_tokenizer(), random.Random(1), 0
    for problem in sample_problems("in-distribution", 100, seed=4):
        for statements in (problem.statements, substitute_operands(problem, rng, 0.5)):
            text, defined, expected = ";".join(statements) + ";?", set(), []
            for statement in statements:  # resolvable: a literal operand or one defined further left
                if statement[2].isdigit() or statement[2] in defined:
                    defined.add(statement[0])
                    expected.append((text.index(statement) + len(statement) + 1, str(problem.values[statement[0]])))
            assert resolved_statement_targets(statements, problem.values) == expected
            assert all(text[i - 1] == ";" for i, _ in expected)
            resolved += len(expected) < len(statements)
    assert resolved > 20  # some statements need a later one and stay unsupervised

    plain = training_batch(tok, random.Random(3), 8, (2, 4), ChainOptions(n_queries=3, n_repeats=2))
    rich = training_batch(
        tok, random.Random(3), 8, (2, 4), ChainOptions(n_queries=3, n_repeats=2, statement_values=True)
    )
    assert torch.equal(plain["input_ids"], rich["input_ids"])  # the same text: only labels are added
    kept = plain["labels"] != -100
    assert torch.equal(rich["labels"][kept], plain["labels"][kept])
    for row in range(8):
        text = row_text(tok, rich["input_ids"][row], rich["attention_mask"][row])
        statements = written_statements(text)
        rules = parse(statements, LITERAL_STATEMENT)
        values = {name: resolve(rules, name)[0] for name in rules}
        added = [
            (i, tok.convert_ids_to_tokens(int(rich["labels"][row, i])))
            for i in (rich["labels"][row] != -100).logical_and(~kept[row]).nonzero().flatten().tolist()
        ]
        assert added == resolved_statement_targets(statements, values)


def places_by_chain(statements: tuple[str, ...]) -> dict[str, set[int]]:
    """The literal variable of each chain -> the places of that chain's statements."""
    rules, places = parse(list(statements)), {}
    for place, statement in enumerate(statements):
        name = statement[0]
        while len(rules[name]) == 3:
            name = rules[name][0]
        places.setdefault(name, set()).add(place)
    return places


def in_backward_order(statements: tuple[str, ...]) -> bool:
    place = {statement[0]: i for i, statement in enumerate(statements)}
    return all(place[name] < place[rule[0]] for name, rule in parse(list(statements)).items() if len(rule) == 3)


def in_forward_order(statements: tuple[str, ...]) -> bool:
    place = {statement[0]: i for i, statement in enumerate(statements)}
    return all(place[name] > place[rule[0]] for name, rule in parse(list(statements)).items() if len(rule) == 3)


def test_backward_order_puts_every_statement_before_its_operand():
    rng, moved = random.Random(5), 0
    for problem in sample_problems("in-distribution", 100, seed=6):
        rng_state = rng.getstate()
        assert chain_order(problem, rng) is problem
        assert rng.getstate() == rng_state  # nothing drawn: old data streams unchanged
        backward = chain_order(problem, rng, backward=1.0)
        rules = parse(list(backward.statements))
        assert sorted(backward.statements) == sorted(problem.statements)
        assert {name: resolve(rules, name)[0] for name in rules} == problem.values
        assert evaluate_prompt(backward.prompt) == int(backward.answer) == int(problem.answer)
        assert PROMPT.fullmatch(backward.prompt) and backward.prompt.endswith(f";?{problem.target}=")
        assert in_backward_order(backward.statements)
        # Each chain keeps the places it had, so chains stay interleaved as the generator shuffled them.
        assert places_by_chain(backward.statements) == places_by_chain(problem.statements)
        assert len(resolved_statement_targets(backward.statements, backward.values)) == len(chain_lengths(rules))
        moved += backward.statements != problem.statements
    assert moved > 50
    tok = build_tokenizer()
    batch = ChainBatches(tok, 1, 8, (2, 4), ChainOptions(n_queries=3, n_repeats=0, backward=1.0)).batch(0)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        statements = row_text(tok, ids, mask).split(";?")[0].split(";")
        assert in_backward_order(tuple(statements))
    with pytest.raises(ValueError, match="backward must be a number in"):
        chain_order(sample_problems("harder", 1, seed=0)[0], random.Random(0), -0.1)
    with pytest.raises(ValueError, match="forward must be a number in"):
        chain_order(sample_problems("harder", 1, seed=0)[0], random.Random(0), forward=1.5)


def test_forward_order_makes_every_statement_resolvable_from_the_ones_before_it():
    rng = random.Random(7)
    for problem in sample_problems("in-distribution", 100, seed=8):
        forward = chain_order(problem, rng, forward=1.0)
        assert sorted(forward.statements) == sorted(problem.statements)
        assert evaluate_prompt(forward.prompt) == int(forward.answer) == int(problem.answer)
        assert in_forward_order(forward.statements)
        assert places_by_chain(forward.statements) == places_by_chain(problem.statements)
        resolved = resolved_statement_targets(forward.statements, forward.values)
        assert len(resolved) == len(forward.statements)  # every statement, not only each chain's literal


def test_chain_order_draws_one_number_and_splits_it_between_the_orders():
    problems = sample_problems("in-distribution", 400, seed=9, hops=3)
    rng, drawn = random.Random(10), random.Random(10)
    orders = []
    for problem in problems:
        ordered = chain_order(problem, rng, backward=0.3, forward=0.5)
        draw = drawn.random()  # the same single draw: a run with only --chain-backward keeps its data stream
        expected = "backward" if draw < 0.3 else "forward" if draw < 0.8 else "as generated"
        if expected == "as generated":
            assert ordered is problem
        else:
            assert (in_backward_order if expected == "backward" else in_forward_order)(ordered.statements)
        orders.append(expected)
    assert {"backward", "forward", "as generated"} == set(orders)
    with pytest.raises(ValueError, match="backward \\+ forward must be <= 1"):
        chain_order(problems[0], rng, backward=0.6, forward=0.6)
    with pytest.raises(ValueError, match="backward \\+ forward"):
        ChainOptions(backward=0.6, forward=0.6)


def test_paced_labels_name_the_variable_reached_until_the_chain_is_resolved():
    tok = build_tokenizer()
    plain = training_batch(
        tok, random.Random(3), 8, (0, 6), ChainOptions(n_queries=6, n_repeats=2, literal_operands=0.25)
    )
    paced = training_batch(
        tok, random.Random(3), 8, (0, 6), ChainOptions(n_queries=6, n_repeats=2, literal_operands=0.25, paced=True)
    )
    assert all(torch.equal(plain[k], paced[k]) for k in plain)  # the same data: only chase_labels are added
    longest, named = paced["chase_labels"].shape[-1], 0
    for r in range(1, longest + 3):
        labels = paced_labels(paced["labels"], paced["chase_labels"], r)
        for row in range(8):
            text = row_text(tok, paced["input_ids"][row], paced["attention_mask"][row])
            rules = parse(written_statements(text), LITERAL_STATEMENT)
            expected = paced["labels"][row].clone()
            for match in QUERY.finditer(text):
                path = walk(rules, match.group(1))
                if r < len(path):  # still r links down the chain: the readout names where it has got to
                    expected[match.end() - 1] = tok.convert_tokens_to_ids(path[r])
                    named += 1
            assert torch.equal(labels[row], expected), (r, text)
    assert named > 20
    assert torch.equal(paced_labels(paced["labels"], paced["chase_labels"], longest + 1), paced["labels"])


def test_paced_targets_name_the_variable_reached_or_the_running_offset():
    rng, offsets_seen, names_seen = random.Random(5), 0, 0
    for problem in sample_problems("in-distribution", 60, seed=9):
        written = substitute_operands(problem, rng, 0.25)
        rules = parse(list(written), LITERAL_STATEMENT)
        for name in problem.values:
            path = walk(rules, name)
            assert paced_targets(written, problem.values, name, rng) == path[1:]  # default: the variables only
            value = resolve(rules, name)[0]
            offsets = [str((value - resolve(rules, v)[0]) % 10) for v in path[1:]]
            assert paced_targets(written, problem.values, name, rng, 1.0) == offsets
            mixed = paced_targets(written, problem.values, name, rng, 0.5)
            assert all(label in (v, o) for label, v, o in zip(mixed, path[1:], offsets, strict=True))
            offsets_seen += sum(label.isdigit() for label in mixed)
            names_seen += sum(label.isalpha() for label in mixed)
    assert offsets_seen > 20 and names_seen > 20
    with pytest.raises(ValueError, match="offsets"):
        paced_targets(("a=1",), {"a": 1}, "a", rng, 1.5)


def test_paced_offsets_reach_the_batches():
    tok = build_tokenizer()
    batches = ChainBatches(tok, 0, 8, (2, 4), ChainOptions(n_queries=6, paced=True, paced_offsets=1.0))
    batch = batches.batch(0)
    chase_ids = batch["chase_labels"][batch["chase_labels"] != -100]
    assert chase_ids.numel() > 20
    assert set(tok.convert_ids_to_tokens(chase_ids.tolist())) <= set(string.digits)  # offsets only


def test_read_digits_follow_the_walk_one_statement_per_step():
    statements = SPEC_EXAMPLE[:-4].split(";")
    assert [SPEC_EXAMPLE[i] for i in read_digits(statements, "g")] == ["8", "0"]  # g=d-8, then d=0
    assert [SPEC_EXAMPLE[i] for i in read_digits(statements, "q")] == ["3", "9"]
    assert [SPEC_EXAMPLE[i] for i in read_digits(statements, "t")] == ["9", "6"]


def test_carry_inputs_show_each_step_only_the_digit_it_reads():
    tok = build_tokenizer()
    batch = training_batch(tok, random.Random(4), 32, (0, 5), ChainOptions(n_queries=1, paced=True, carry=0.75))
    ids, steps = batch["input_ids"], batch["step_input_ids"]
    hidden, paths = 0, []
    for row in range(len(ids)):
        text = row_text(tok, ids[row], batch["attention_mask"][row])
        statements = written_statements(text)
        rules = parse(statements)
        path = walk(rules, QUERY.search(text).group(1))
        paths.append(path)
        ends = {s[0]: len(";".join(statements[: k + 1])) - 1 for k, s in enumerate(statements)}
        reads = [ends[name] for name in path]  # the digit ends each statement
        changed = steps[row] != ids[row, :, None]  # (T, L)
        if not changed.any():
            continue  # a row trained as written
        hidden += 1
        for column in range(steps.shape[-1]):
            shown = {reads[column]} if column < len(reads) else set()
            assert set(changed[:, column].nonzero().flatten().tolist()) == set(reads) - shown, (text, column)
            wrong = tok.convert_ids_to_tokens(steps[row, sorted(set(reads) - shown), column].tolist())
            assert all(digit in string.digits for digit in wrong)
    assert 12 < hidden < 32
    assert steps.shape == (*ids.shape, 1 + max(map(len, paths)))
    assert "step_input_ids" not in training_batch(
        tok, random.Random(4), 4, (0, 5), ChainOptions(n_queries=1, paced=True)
    )
    for bad in ({"paced": False}, {"n_queries": 2}, {"n_repeats": 1}, {"literal_operands": 0.5}):
        options = {"paced": True, "n_queries": 1, "n_repeats": 0, **bad}
        with pytest.raises(ValueError, match="carry hides the digits"):
            ChainOptions(carry=0.5, **options)
    with pytest.raises(ValueError, match="carry"):
        ChainOptions(n_queries=1, paced=True, carry=2)
    every = carry_inputs(ids[:1], [None], list(range(10)), random.Random(0))
    assert torch.equal(every, ids[:1, :, None])
