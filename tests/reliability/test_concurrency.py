"""Two threads generating with one model (each call with its own cache) get what sequential calls get."""

import threading

import torch

from modeling_recurrent import RecurrentCache

from ..conftest import tiny_model

CALLS = [
    dict(num_steps=6, max_new_tokens=8),
    dict(num_steps=3, max_new_tokens=8, exit_criterion="latent-diff", exit_threshold=0.05, warm_start=True),
    dict(num_steps=5, max_new_tokens=6, num_beams=2),
    dict(num_steps=7, max_new_tokens=8, cache_slots=2),
]


def run(model, prompt, options):
    options = dict(options)
    if "cache_slots" in options:
        options["cache"] = RecurrentCache(model.config, core_slots=options.pop("cache_slots"))
    return model.generate(prompt, init_scale=0.0, do_sample=False, **options)


def test_threads_sharing_a_model_match_sequential_calls():
    model = tiny_model(mean_recurrence=8)
    prompts = [torch.randint(1, 64, (2, 5 + i), generator=torch.Generator().manual_seed(i)) for i in range(len(CALLS))]
    expected = [run(model, p, c) for p, c in zip(prompts, CALLS, strict=True)]
    results, errors = {}, []
    start = threading.Barrier(2)

    def worker(indices):
        start.wait()
        try:
            for i in indices:
                results.setdefault(i, []).append(run(model, prompts[i], CALLS[i]))
        except Exception as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(indices,)) for indices in ([0, 1, 2, 3], [3, 2, 1, 0])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for i, want in enumerate(expected):
        assert len(results[i]) == 2 and all(torch.equal(got, want) for got in results[i]), i
