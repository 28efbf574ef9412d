"""Training data for the chain task: batches of problems with their answers (and optionally more) supervised.

`ChainBatches` draws problems of `chain_task` and labels them for `recurrent-depth train`. Beyond the answer, the
options add denser or differently shaped supervision, each a research aid (the shipped model's card and
docs/experiments/README.md say what each did): more queries per problem, repeated statements, literal operands,
statement values, backward- or forward-ordered chains, paced labels (one look-up per recurrence step, with running
offsets) and carried digits (each step sees only the digit its walk reads). Evaluation never uses them: it asks the
spec's question.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerFast

from .chain_task import (
    IGNORE_INDEX,
    MODULUS,
    SEPARATOR,
    SPLITS,
    ChainEncoder,
    Problem,
    chase,
    check_count,
    check_range,
    format_prompt,
    generate_problem,
)


def check_probability(name: str, value: object) -> float:
    """`value` as a float, or ValueError naming `name` unless it is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_queries(value: object) -> int:
    """`value` if it is an int >= 1 (answered queries per problem); else a ValueError naming n_queries."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"n_queries must be an int >= 1, got {value!r}")
    return value


def substitute_operands(problem: Problem, rng: random.Random, probability: float) -> tuple[str, ...]:
    """The problem's statements with each dependent one's variable operand replaced, with `probability`, by that
    variable's value (`g=d-8` -> `g=0-8` when d is 0). Every variable keeps its value; a substituted link costs one
    hop less, so the arithmetic of a hop can be learned apart from the indirection it follows."""
    if check_probability("probability", probability) == 0:
        return problem.statements  # draws nothing: data streams without substitution stay as they were
    return tuple(
        f"{s[:2]}{problem.values[s[2]]}{s[3:]}" if s[2] in problem.values and rng.random() < probability else s
        for s in problem.statements
    )


def paced_targets(
    statements: Sequence[str], values: dict[str, int], name: str, rng: random.Random, offsets: float = 0.0
) -> list[str]:
    """What a query of `name` is labelled with after r = 1, 2, ... recurrence steps while its chase lasts: the variable
    reached, `chase(statements, name)[r]`, or with probability `offsets` the running offset, value(name) - value(that
    variable) mod 10 (`?g=` -> `d` or `2` for `g=d-8`). From r = len(chase) on, the label is the answer (not listed).

    The offset is what the look-ups so far add on top of the variable reached; it turns into the answer when the
    chase ends, so a readout trained on both names the whole state an iterated look-up has to carry."""
    path = chase(statements, name)
    if check_probability("offsets", offsets) == 0:
        return path[1:]  # probability 0 draws nothing: data streams without the option stay as they were
    return [str((values[name] - values[v]) % 10) if rng.random() < offsets else v for v in path[1:]]


def read_digits(statements: Sequence[str], name: str) -> list[int]:
    """Character indices in `";".join(statements)` of the digits a look-up from `name` reads, one per recurrence step:
    at step r the digit of the statement defining `chase(statements, name)[r - 1]` (`[8, 2]` for `d=0;g=d-8`,
    from `g`: first `g=d-8`'s 8, then `d=0`'s 0)."""
    digit = {statement[0]: end - 1 for statement, end in zip(statements, _separators(statements), strict=True)}
    return [digit[v] for v in chase(statements, name)]


def _separators(statements: Sequence[str]) -> list[int]:
    """Index in `";".join(statements) + ";"` of the `;` after each statement (each statement's last digit is just
    before it)."""
    ends, end = [], -1
    for statement in statements:
        end += 1 + len(statement)
        ends.append(end)
    return ends


def check_carry(carry: object, paced: bool, n_queries: int, n_repeats: int, literal_operands: float) -> float:
    """`carry` as a probability, after checking the batches it needs: paced labels, a single query per problem and
    statements as the spec writes them (the hidden digits are those of the target's chain; another query, a
    repeated statement or a substituted operand would show them)."""
    probability = check_probability("carry", carry)
    if probability and (not paced or n_queries != 1 or n_repeats != 0 or literal_operands):
        raise ValueError(
            "carry needs paced, n_queries 1, n_repeats 0 and literal_operands 0: carry hides the digits of the "
            f"target's chain (got paced={paced}, n_queries={n_queries}, n_repeats={n_repeats}, "
            f"literal_operands={literal_operands})"
        )
    return probability


@dataclass(frozen=True)
class ChainOptions:
    """How training problems are written and labelled beyond the spec's question; checked on construction.

    `n_queries` answered queries and `n_repeats` repeated statements per problem (`training_example`);
    `literal_operands` the chance of a statement written with its operand's value (`substitute_operands`);
    `statement_values` also supervises every statement resolvable from the ones before it
    (`resolved_statement_targets`); `backward` and `forward` the chances that a problem's chains are written in
    backward or forward order (`chain_order`); `paced` adds `chase_labels` for `paced_labels`, with `paced_offsets`
    the chance of a running offset in them (`paced_targets`); `carry` the chance that a problem's steps see only the
    digits they read (`carry_inputs`, as `step_input_ids`). Error messages name fields as words: `TrainArgs` rewrites
    each field name into the command-line option that sets it.
    """

    n_queries: int = 4
    n_repeats: int = 0
    literal_operands: float = 0.0
    statement_values: bool = False
    backward: float = 0.0
    forward: float = 0.0
    paced: bool = False
    paced_offsets: float = 0.0
    carry: float = 0.0

    def __post_init__(self) -> None:
        check_queries(self.n_queries)
        check_count("n_repeats", self.n_repeats)
        for name in ("literal_operands", "paced_offsets"):
            check_probability(name, getattr(self, name))
        check_orders(self.backward, self.forward)
        if self.paced_offsets and not self.paced:
            raise ValueError("paced_offsets labels the steps of paced: give both")
        check_carry(self.carry, self.paced, self.n_queries, self.n_repeats, self.literal_operands)


def carry_inputs(
    input_ids: torch.Tensor, reads: Sequence[Sequence[int] | None], digit_ids: Sequence[int], rng: random.Random
) -> torch.Tensor:
    """The inputs each recurrence step sees (B, T, L) for `input_ids` (B, T): at step r (column r - 1) the digits of
    a row's `reads` (`read_digits`) are replaced by wrong ones, each drawn afresh, except the one step r reads; the
    last column, which every later step uses, hides them all. A row whose `reads` is None sees `input_ids` at
    every step. `digit_ids[d]` is the id of digit d.

    A step that sees a chain's digits only when it reads them can get the running offset nowhere but from the state
    its earlier steps left: trained so, the answering position carries the sum instead of re-reading the statements
    (which works for two links and not for three)."""
    depth = 1 + max((len(r) for r in reads if r is not None), default=0)
    steps = input_ids[..., None].repeat(1, 1, depth)
    digit_of = {int(i): d for d, i in enumerate(digit_ids)}
    cells: list[tuple[int, int, int, int]] = []  # (row, position, step, wrong id)
    for row, positions in enumerate(reads):
        if positions is None:
            continue
        true = [digit_of[i] for i in input_ids[row, positions].tolist()]
        for step in range(depth):
            cells.extend(
                (row, col, step, digit_ids[(true[k] + rng.randint(1, MODULUS - 1)) % MODULUS])
                for k, col in enumerate(positions)
                if k != step
            )
    if cells:  # one indexed write for the whole batch
        rows, cols, columns, ids = map(list, zip(*cells, strict=True))
        steps[rows, cols, columns] = torch.tensor(ids)
    return steps


def check_orders(backward: object, forward: object) -> float:
    """The chance that a problem is reordered, `backward + forward`, after checking both chances and their sum."""
    total = check_probability("backward", backward) + check_probability("forward", forward)
    if total > 1:
        raise ValueError(f"backward + forward must be <= 1, got {backward} + {forward}")
    return total


def chain_order(problem: Problem, rng: random.Random, backward: float = 0.0, forward: float = 0.0) -> Problem:
    """With chance `backward`, the problem with each chain's statements moved, within the places that chain occupies,
    into backward order (every statement before the one defining its operand: `g=d-8;...;d=0`); with chance
    `forward`, into forward order (every statement after it: `d=0;...;g=d-8`); else `problem` itself.

    In backward order no statement's value follows from the ones before it, so only the answering position can
    resolve a chain, one look-up per hop. In forward order every statement's value does, so each position can resolve
    its own from the one before (what `statement_values` supervises)."""
    reordered = check_orders(backward, forward)
    if reordered == 0:
        return problem  # nothing drawn: data streams without the options stay as they were
    draw = rng.random()
    if draw >= reordered:
        return problem
    chains: dict[str, list[tuple[int, int]]] = {}  # root -> (depth, place) of each of its statements
    for place, statement in enumerate(problem.statements):
        path = chase(problem.statements, statement[0])
        chains.setdefault(path[-1], []).append((len(path) - 1, place))
    statements = list(problem.statements)
    for members in chains.values():
        in_order = sorted(members, reverse=draw < backward)  # deepest first for backward order
        for place, (_, source) in zip(sorted(p for _, p in members), in_order, strict=True):
            statements[place] = problem.statements[source]
    return replace(problem, prompt=format_prompt(statements, problem.target), statements=tuple(statements))


def resolved_statement_targets(statements: Sequence[str], values: dict[str, int]) -> list[tuple[int, str]]:
    """`(index, digit)` for each statement of `";".join(statements)` whose value follows from the statements before
    it (a literal, a substituted operand, or an operand resolved earlier): the digit is that statement's value (from
    the problem's `values`), the label at the character after its `;`, so the model predicts it at the `;`.

    A causal model can resolve only these (the others need a later statement); supervising them teaches each
    position to hold its variable's value."""
    resolved: set[str] = set()
    targets = []
    for statement, end in zip(statements, _separators(statements), strict=True):
        operand = statement[2]
        if operand.isdigit() or operand in resolved:
            resolved.add(statement[0])
            targets.append((end + 1, str(values[statement[0]])))
    return targets


def training_example(
    problem: Problem, rng: random.Random, n_queries: int, n_repeats: int = 0, literal_operands: float = 0.0
) -> tuple[str, list[int]]:
    """Statements, then `n_repeats` of them repeated (`;b=9`), then up to `n_queries` answered queries `;?x=a` (the
    target and other variables, in random order), and the character indices that are supervised: the answer digits,
    and every character of a repeated statement after its variable name.

    Repeats teach the look-up the queries need (what followed `b=` earlier follows `b=` again: an induction head)
    with dense supervision. `literal_operands` is the chance that a dependent statement is written with its operand's
    value instead of its name (`substitute_operands`). `n_queries=1, n_repeats=0` gives exactly
    `problem.prompt + problem.answer`."""
    check_queries(n_queries)
    check_count("n_repeats", n_repeats)
    statements = substitute_operands(problem, rng, literal_operands)
    others = [name for name in problem.values if name != problem.target]
    queried = [problem.target, *rng.sample(others, min(n_queries - 1, len(others)))]
    rng.shuffle(queried)  # else the model could learn that the first query is always the target
    parts = [SEPARATOR.join(statements)]
    length = len(parts[0])
    positions: list[int] = []
    for statement in rng.sample(statements, min(n_repeats, len(statements))):
        parts.append(SEPARATOR + statement)
        positions.extend(range(length + 2, length + 1 + len(statement)))  # after ';' and the variable name
        length += 1 + len(statement)
    for name in queried:
        query = f"{SEPARATOR}?{name}={problem.values[name]}"
        parts.append(query)
        length += len(query)
        positions.append(length - 1)
    return "".join(parts), positions


def paced_labels(labels: torch.Tensor, chase_labels: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The labels (B, T) of a forward pass of `num_steps` recurrence steps, given the batch's `chase_labels`
    (B, T, L): a query whose chase is longer than `num_steps` hops is labelled with the variable reached after
    `num_steps` of them (or the running offset, see `paced_targets`) instead of its value.

    Trained so, the answering position follows one link per step (the readout says where it has got to), which
    makes a chain's depth, not the text order of its statements, set the steps it needs: deeper recurrence then
    answers longer chains."""
    if num_steps > chase_labels.shape[-1]:
        return labels
    reached = chase_labels[..., num_steps - 1]
    return torch.where(reached != IGNORE_INDEX, reached, labels)


def _draw_hops(
    rng: random.Random, n: int, hops: tuple[int, int] | None, hop_weights: Sequence[float] | None
) -> list[int]:
    if hops is not None and hop_weights is not None:
        raise ValueError("give hops or hop_weights, not both")
    if hop_weights is None:
        low, high = check_range("hops", hops or SPLITS["in-distribution"].hops)
        return [rng.randint(low, high) for _ in range(n)]
    if not hop_weights or min(hop_weights) < 0 or sum(hop_weights) <= 0:
        raise ValueError(f"hop_weights must be >= 0 with a positive sum, got {hop_weights!r}")
    return rng.choices(range(len(hop_weights)), weights=hop_weights, k=n)


def training_batch(
    tokenizer: PreTrainedTokenizerFast,
    rng: random.Random,
    batch_size: int,
    hops: tuple[int, int] | None = None,
    options: ChainOptions = ChainOptions(),
    *,
    hop_weights: Sequence[float] | None = None,
    encoder: ChainEncoder | None = None,
) -> dict[str, torch.Tensor]:
    """One batch of in-distribution-style problems written and labelled as `options` say; hops uniform over the
    inclusive range `hops` (default 0-6), or drawn with `hop_weights[h]` the weight of `h` hops (a curriculum)."""
    if check_count("batch_size", batch_size) == 0:
        raise ValueError("batch_size must be >= 1")
    o = options
    spec = SPLITS["in-distribution"]
    texts, positions, targets, paced_steps, reads = [], [], [], [], []
    for h in _draw_hops(rng, batch_size, hops, hop_weights):
        problem = generate_problem(rng, h, n_distractors=spec.n_distractors, distractor_hops=spec.distractor_hops)
        problem = chain_order(problem, rng, o.backward, o.forward)
        text, answers = training_example(problem, rng, o.n_queries, o.n_repeats, o.literal_operands)
        texts.append(text)
        positions.append(answers)
        statements = text.split(SEPARATOR)[: len(problem.statements)]  # as written (operands maybe substituted)
        if o.statement_values:
            targets.append(resolved_statement_targets(statements, problem.values))
        if o.paced:  # a query `;?x=D` is supervised at D, two characters after its variable
            paced_steps.append(
                [
                    (i, paced_targets(statements, problem.values, text[i - 2], rng, o.paced_offsets))
                    for i in answers
                    if text[i - 3] == "?"
                ]
            )
        if o.carry:  # drawn only with the option: data streams without it stay as they were
            reads.append(read_digits(statements, problem.target) if rng.random() < o.carry else None)
    encoder = encoder or ChainEncoder(tokenizer)
    batch = encoder(texts, positions, targets=targets or None, paced_steps=paced_steps if o.paced else None)
    if o.carry:
        batch["step_input_ids"] = carry_inputs(batch["input_ids"], reads, [encoder.ids[d] for d in string.digits], rng)
    return batch


class ChainBatches:
    """Endless training batches; batch k depends only on (seed, k), so a resumed run sees the same data.

    `hops` / `hop_weights` may be reassigned between batches to follow a curriculum; the other arguments are those
    of `training_batch`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        seed: int,
        batch_size: int,
        hops: tuple[int, int] | None = None,
        options: ChainOptions = ChainOptions(),
        *,
        hop_weights: Sequence[float] | None = None,
        start: int = 0,
    ) -> None:
        self.encoder = ChainEncoder(tokenizer)
        self.tokenizer, self.seed, self.batch_size, self.options = tokenizer, seed, batch_size, options
        self.hops, self.hop_weights, self.index = hops, hop_weights, check_count("start", start)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch number `index` (independent of any other batch)."""
        rng = random.Random(f"{self.seed}-{index}")
        return training_batch(
            self.tokenizer,
            rng,
            self.batch_size,
            self.hops,
            self.options,
            hop_weights=self.hop_weights,
            encoder=self.encoder,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.index += 1
        return self.batch(self.index - 1)
