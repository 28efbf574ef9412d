"""The variable-chain reasoning task: generator, splits, character tokenizer, encoder and first-token evaluation.

Specified in `specs/chain-task.md`. A problem such as `d=0;q=b+3;b=9;?g=` ... asks for the value of the last variable
of one chain of `hops` dependent statements, hidden among distractor chains; arithmetic is modulo 10, so the answer
is the single first character the model generates. This module depends only on the standard library, torch,
tokenizers and transformers, so that it can be read (and the task reproduced) on its own; the training batches
built from it are in `chain_training`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VARIABLES = string.ascii_lowercase
ALPHABET = VARIABLES + string.digits + "=+-;?"
MODULUS = 10  # every value is one decimal digit
SEPARATOR = ";"
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<|endoftext|>", "<unk>"
IGNORE_INDEX = -100  # label value the Transformers loss skips
BYTE_IDS = 256  # batches are assembled as bytes, so every id the task uses must fit in one


@dataclass(frozen=True)
class Problem:
    """One problem; `prompt` is what the model sees, `answer` the digit it must generate first."""

    prompt: str
    answer: str
    hops: int
    statements: tuple[str, ...]  # in prompt order (shuffled)
    values: dict[str, int]  # every variable of the problem
    target: str
    chain: tuple[str, ...]  # v0 .. v_hops of the target chain; chain[-1] == target


@dataclass(frozen=True)
class Split:
    """Inclusive (low, high) ranges a split draws its problems from."""

    hops: tuple[int, int]
    n_distractors: tuple[int, int]
    distractor_hops: tuple[int, int]


SPLITS: dict[str, Split] = {
    "in-distribution": Split(hops=(0, 6), n_distractors=(1, 2), distractor_hops=(0, 3)),
    # One short distractor keeps these no longer than training problems: only deeper iteration solves them.
    "harder": Split(hops=(7, 10), n_distractors=(1, 1), distractor_hops=(0, 1)),
}


def check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def check_range(name: str, bounds: tuple[int, int]) -> tuple[int, int]:
    if len(bounds) != 2 or not 0 <= check_count(name, bounds[0]) <= check_count(name, bounds[1]):
        raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {bounds!r}")
    return bounds


def generate_problem(
    rng: random.Random,
    hops: int,
    *,
    n_distractors: tuple[int, int] = (1, 2),
    distractor_hops: tuple[int, int] = (0, 3),
) -> Problem:
    """A problem whose target chain has `hops` dependent statements, plus `n_distractors` distractor chains."""
    check_count("hops", hops)
    check_range("n_distractors", n_distractors)
    check_range("distractor_hops", distractor_hops)
    # Checked against the worst case, so that valid arguments never fail on an unlucky draw.
    most = hops + 1 + n_distractors[1] * (distractor_hops[1] + 1)
    if most > len(VARIABLES):
        raise ValueError(
            f"hops={hops}, n_distractors={n_distractors}, distractor_hops={distractor_hops} can need {most} "
            f"variables, more than the {len(VARIABLES)} letters"
        )
    lengths = [hops] + [rng.randint(*distractor_hops) for _ in range(rng.randint(*n_distractors))]
    names = rng.sample(VARIABLES, sum(lengths) + len(lengths))
    values: dict[str, int] = {}
    statements: list[str] = []
    start = 0
    for length in lengths:
        chain = names[start : start + length + 1]
        start += length + 1
        value = values[chain[0]] = rng.randrange(MODULUS)
        statements.append(f"{chain[0]}={value}")
        for previous, name in zip(chain, chain[1:], strict=False):
            step = rng.randrange(MODULUS)
            if rng.getrandbits(1):
                value, op = (value + step) % MODULUS, "+"
            else:
                value, op = (value - step) % MODULUS, "-"
            values[name] = value
            statements.append(f"{name}={previous}{op}{step}")
    target_chain = tuple(names[: hops + 1])
    target = target_chain[-1]
    rng.shuffle(statements)
    prompt = format_prompt(statements, target)
    return Problem(prompt, str(values[target]), hops, tuple(statements), values, target, target_chain)


def format_prompt(statements: Sequence[str], target: str) -> str:
    return f"{SEPARATOR.join(statements)}{SEPARATOR}?{target}="


def _split(name: str) -> Split:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
    return SPLITS[name]


def sample_problems(
    split: str, n: int, seed: int, hops: int | None = None, *, max_hops: int | None = None
) -> list[Problem]:
    """`n` problems of `split`, reproducible from `seed`; hops uniform over the split's range (capped at `max_hops`)
    unless `hops` fixes them."""
    spec = _split(split)
    check_count("n", n)
    low, high = spec.hops
    if max_hops is not None:
        if check_count("max_hops", max_hops) < low:
            raise ValueError(f"max_hops must be >= {low} for split {split!r}, got {max_hops}")
        high = min(high, max_hops)
    rng = random.Random(seed)
    return [
        generate_problem(
            rng,
            rng.randint(low, high) if hops is None else hops,
            n_distractors=spec.n_distractors,
            distractor_hops=spec.distractor_hops,
        )
        for _ in range(n)
    ]


def chase(statements: Sequence[str], name: str) -> list[str]:
    """The variables a look-up from `name` visits, as `statements` are written: `name`, its operand, that one's
    operand, ... down to the variable set by a literal (`[g, d]` for `g=d-8;d=0`; a substituted operand, `g=0-8`,
    ends the chase at `g`)."""
    operand = {s[0]: s[2] for s in statements}
    if name not in operand:
        raise ValueError(f"no statement defines {name!r}")
    path = [name]
    while not operand[path[-1]].isdigit():
        path.append(operand[path[-1]])
    return path


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: `<pad>`=0, `<|endoftext|>`=1, `<unk>`=2, then one id per character of ALPHABET."""
    vocab = {token: i for i, token in enumerate([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # Every character (whitespace included) is its own pre-token, so unknown text still costs one id per char.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters without the spaces WordLevel decoding would insert
    backend.add_special_tokens([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,  # generation may need a bos for empty prompts; it is never added automatically
        unk_token=UNK_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


class ChainEncoder:
    """Task text -> right-padded id tensors, via a str.translate table (the hot path avoids the tokenizer call)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        vocab = tokenizer.get_vocab()
        ids = {char: vocab[char] for char in ALPHABET if char in vocab}
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        if len(ids) < len(ALPHABET) or self.pad_id is None or self.eos_id is None:
            raise ValueError("the tokenizer needs a pad token, an eos token and one token per task character")
        if max(*ids.values(), self.pad_id, self.eos_id) >= BYTE_IDS:
            raise ValueError(f"the task's token ids must be < {BYTE_IDS}")
        self.ids = ids
        self.table = str.maketrans({char: chr(i) for char, i in ids.items()})

    def __call__(
        self,
        texts: Sequence[str],
        positions: Sequence[Sequence[int]],
        eos: bool = True,
        targets: Sequence[Sequence[tuple[int, str]]] | None = None,
        paced_steps: Sequence[Sequence[tuple[int, Sequence[str]]]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Right-padded ids; labels are the ids at `positions` (and at the appended eos), the given character at each
        `(index, char)` of `targets`, IGNORE_INDEX elsewhere. Each `(index, steps)` of `paced_steps` (a query's answer
        and its `paced_targets`) adds `chase_labels` (B, T, L): at `[row, index, r - 1]` the id of `steps[r - 1]`,
        what a look-up one hop per recurrence step is labelled with after r steps (see `paced_labels`)."""
        width = max(map(len, texts)) + eos
        buffer = bytearray([self.pad_id]) * (len(texts) * width)
        lengths: list[int] = []
        rows: list[int] = []
        cols: list[int] = []
        for row, (text, answers) in enumerate(zip(texts, positions, strict=True)):
            encoded = text.translate(self.table).encode("latin-1") + bytes([self.eos_id] if eos else [])
            buffer[row * width : row * width + len(encoded)] = encoded
            lengths.append(len(encoded))
            rows.extend([row] * (len(answers) + eos))
            cols.extend([*answers, len(encoded) - 1] if eos else answers)
        input_ids = torch.frombuffer(buffer, dtype=torch.uint8).view(len(texts), width).long()
        attention_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[rows, cols] = input_ids[rows, cols]
        cells = [(row, col, self.ids[char]) for row, pairs in enumerate(targets or ()) for col, char in pairs]
        if cells:  # one indexed write for the whole batch
            target_rows, target_cols, target_ids = zip(*cells, strict=True)
            labels[list(target_rows), list(target_cols)] = torch.tensor(target_ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if paced_steps is not None:
            links = [
                (row, col, r, self.ids[char])
                for row, pairs in enumerate(paced_steps)
                for col, steps in pairs
                for r, char in enumerate(steps)
            ]
            depth = 1 + max((r for _, _, r, _ in links), default=0)
            batch["chase_labels"] = torch.full((*input_ids.shape, depth), IGNORE_INDEX)
            if links:
                rows, cols, steps, ids = map(list, zip(*links, strict=True))
                batch["chase_labels"][rows, cols, steps] = torch.tensor(ids)
        return batch


def accuracy_by_hops(predictions: Sequence[str], problems: Sequence[Problem]) -> dict:
    """`{"accuracy": overall, "by_hops": {hops: accuracy}}`, a prediction counting when its first char is the answer."""
    if len(predictions) != len(problems):
        raise ValueError(f"{len(predictions)} predictions for {len(problems)} problems")
    tally: dict[int, list[int]] = {}
    for prediction, problem in zip(predictions, problems, strict=True):
        tally.setdefault(problem.hops, []).append(prediction[:1] == problem.answer)
    correct = [hit for hits in tally.values() for hit in hits]
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "by_hops": {h: sum(hits) / len(hits) for h, hits in sorted(tally.items())},
    }


@torch.no_grad()
def evaluate_first_token(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    split: str,
    n: int,
    *,
    seed: int,
    max_hops: int | None = None,
    batch_size: int = 64,
    **forward_kwargs: object,
) -> dict:
    """Greedy first generated token on `n` fresh problems (as `generate` would pick it); `accuracy_by_hops` result.

    `forward_kwargs` (e.g. `num_steps`) go to the model's forward.
    """
    problems = sample_problems(split, n, seed, max_hops=max_hops)
    device = getattr(model, "device", torch.device("cpu"))  # a PreTrainedModel's; plain modules run on the CPU
    predictions: list[str] = []
    for ids, mask, last in prompt_batches(tokenizer, [p.prompt for p in problems], batch_size, device):
        logits = model(input_ids=ids, attention_mask=mask, **forward_kwargs).logits
        best = logits[torch.arange(len(ids), device=device), last].argmax(-1)
        predictions.extend(token or "" for token in tokenizer.convert_ids_to_tokens(best.tolist()))
    return accuracy_by_hops(predictions, problems)


def prompt_batches(
    tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Prompts in batches of `batch_size`: right-padded ids and attention mask (B, T) on `device`, and each row's
    last prompt character (B,), where the first generated token is read."""
    encoder = ChainEncoder(tokenizer)
    for begin in range(0, len(prompts), batch_size):
        chunk = list(prompts[begin : begin + batch_size])
        batch = encoder(chunk, [[] for _ in chunk], eos=False)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        yield ids, mask, mask.sum(1) - 1
