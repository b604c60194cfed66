"""generate across N processes (lanskap/generate/shards.py): the same batches, each drawn once, the same bytes for any
N, resumable with any N; one progress line; CPU threads decided per device.

The schedule is tested with N threads standing in for `accelerate launch`'s processes (the same gather and broadcast
calls, on a barrier); tests/test_generate_processes_launch.py runs the real launcher on CPU."""

import hashlib
import io
import re
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from lanskap.core import console, determinism
from lanskap.core.errors import UserError
from lanskap.core.params import conf_group
from lanskap.generate import sampling
from lanskap.generate.resume import ImageCache
from lanskap.generate.shards import Processes, agree, batches, require_splittable


class Group:
    """What N processes share: one slot each, and a barrier."""

    def __init__(self, count: int):
        self.count, self.barrier, self.slots = count, threading.Barrier(count, timeout=30), [None] * count


@dataclass(frozen=True)
class ThreadProcesses(Processes):
    """Processes' collectives between threads (torch.distributed's gather_object and broadcast_object_list)."""

    group: Group = None

    def gather(self, item):
        self.group.slots[self.rank] = item
        self.group.barrier.wait()
        received = list(self.group.slots) if self.main else None
        self.group.barrier.wait()
        return received

    def broadcast(self, item):
        if self.main:
            self.group.slots[0] = item
        self.group.barrier.wait()
        received = self.group.slots[0]
        self.group.barrier.wait()
        return received


def run_on_threads(count: int, work) -> list:
    """`work(processes)` on `count` threads, one per rank; their results in rank order (an error is re-raised)."""
    group, results, errors = Group(count), [None] * count, []

    def one(rank: int) -> None:
        try:
            results[rank] = work(ThreadProcesses(rank, count, group))
        except BaseException as error:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=one, args=(rank,)) for rank in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def drawn(monkeypatch) -> list[list[int]]:
    """sampling.sample replaced by a stand-in whose images depend on the whole batch (as a conv's last bits can):
    a batch composed differently gives other bytes. Records the seeds of each call."""
    calls = []

    def fake_sample(pipeline, captions, seeds, params, resolution, steps):
        calls.append(list(seeds))
        return [
            Image.fromarray(np.random.default_rng([seed, *seeds]).integers(0, 256, (8, 8, 3), np.uint8))
            for seed in seeds
        ]

    monkeypatch.setattr(sampling, "sample", fake_sample)
    monkeypatch.setattr(sampling, "native_resolution", lambda pipeline: 8)
    return calls


def jobs_and_params(prompts: int = 7):
    params = conf_group("generate", images_per_prompt=2, batch_size=3)
    return sampling.plan_jobs([f"caption {i}" for i in range(prompts)], params), params


def tree(folder) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.png"))}


def generate_on(count: int, folder, cache_folder=None) -> list:
    jobs, params = jobs_and_params()

    def work(processes):
        cache = ImageCache(cache_folder) if cache_folder else None
        return sampling.generate_images(None, jobs, params, folder, "base", cache, processes)

    return run_on_threads(count, work)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_n_processes_draw_each_global_batch_once_and_the_main_one_writes_the_bytes_of_one(tmp_path, drawn, count):
    jobs, params = jobs_and_params()
    sampling.generate_images(None, jobs, params, tmp_path / "one", "base")
    reference, global_batches = tree(tmp_path / "one"), [[job.seed for job in batch] for batch in batches(jobs, 3)]
    assert drawn == global_batches and len(global_batches) == 5  # 14 images: 4 batches of 3 and one of 2
    drawn.clear()
    paths = generate_on(count, tmp_path / "many")
    assert sorted(drawn) == sorted(global_batches)  # the same batches, each drawn once, by whichever process
    assert tree(tmp_path / "many") == reference
    assert paths[0] == [tmp_path / "many" / sampling.image_name(job) for job in jobs]
    assert all(other == [] for other in paths[1:])  # only the main process returns (and writes) images


def test_a_run_resumes_with_another_number_of_processes_drawing_only_what_is_missing(tmp_path, drawn):
    jobs, params = jobs_and_params()
    sampling.generate_images(None, jobs, params, tmp_path / "one", "base")
    reference = tree(tmp_path / "one")
    generate_on(2, tmp_path / "first", tmp_path / "cache")  # as a killed two-process run left its cache:
    cache = ImageCache(tmp_path / "cache")
    (cache.folder / "0001_01.png.sha256").unlink()  # batch 1 (jobs 3-5) incomplete
    (cache.folder / "0006_01.png").write_bytes(b"truncated")  # batch 4 (job 13) damaged
    drawn.clear()
    generate_on(3, tmp_path / "resumed", tmp_path / "cache")
    seeds = [job.seed for job in jobs]
    assert sorted(drawn) == [seeds[3:6], seeds[12:14]]  # whole batches, as composed in an uninterrupted run
    assert tree(tmp_path / "resumed") == tree(tmp_path / "first") == reference
    drawn.clear()
    generate_on(1, tmp_path / "again", tmp_path / "cache")
    assert drawn == [] and tree(tmp_path / "again") == reference


def test_more_processes_than_batches_are_refused_with_the_fix(tmp_path):
    require_splittable(5, Processes(0, 5))
    with pytest.raises(UserError, match=r"6 processes for 5 batches.*at most 5 processes, or lower generate"):
        require_splittable(5, Processes(0, 6))


def test_processes_that_disagree_on_what_decides_the_images_are_refused():
    assert run_on_threads(3, lambda processes: agree({"base": "k1"}, processes, "keys")) == [{"base": "k1"}] * 3
    with pytest.raises(UserError, match="the processes disagree on keys"):
        run_on_threads(2, lambda processes: agree({"base": f"k{processes.rank}"}, processes, "keys"))


def test_only_the_main_process_draws_a_progress_line(monkeypatch):
    for rank, shown in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        stream = io.StringIO()
        with console.progress(total=4, desc="generate", unit="image", file=stream, disable=False) as bar:
            bar.update(4)
        assert ("4/4" in stream.getvalue()) is shown, (rank, stream.getvalue())
    monkeypatch.delenv("RANK")
    stream = io.StringIO()
    for _ in console.progress(range(3), desc="preprocess", file=stream):  # alone (no launcher): drawn, as before
        pass
    assert "3/3" in stream.getvalue()


@pytest.mark.parametrize(
    ("device", "switch", "local_processes", "expected"),
    [
        ("cpu", None, None, 1),  # the demo, CI: the pinned thread, whose bytes are recorded
        ("cpu", None, "2", 1),  # CPU processes under accelerate launch: the same
        ("cuda", None, None, 8),  # a GPU host: the CPU only loads, decodes and encodes: every core
        ("cuda", None, "4", 2),  # four GPU processes on this machine share its cores
        ("cuda", None, "16", 1),
        ("cuda", "native", None, 0),  # LANSKAP_CPU_MATH=native: the libraries' own choice, left alone
        ("cpu", "native", None, 0),
    ],
)
def test_cpu_threads_are_decided_per_device(monkeypatch, device, switch, local_processes, expected):
    monkeypatch.setattr(determinism, "available_cores", lambda: 8)
    for name, value in ((determinism.SWITCH, switch), ("LOCAL_WORLD_SIZE", local_processes)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert determinism.threads_for_device(device) == expected


def test_using_the_cores_on_a_gpu_host_sets_torch_and_the_workers_threads(monkeypatch):
    import torch

    monkeypatch.setattr(determinism, "available_cores", lambda: 3)
    monkeypatch.delenv(determinism.SWITCH, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    before = torch.get_num_threads()
    try:
        assert determinism.use_threads_for_device("cuda") == 3
        assert torch.get_num_threads() == 3 and determinism.os.environ["OMP_NUM_THREADS"] == "3"
        assert determinism.use_threads_for_device("cpu") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_reused_images_count_as_done_but_not_in_the_rate(monkeypatch):
    """A resumed run: 6 of 10 images from the cache at once, then 2 drawn in 10 s: 5 s per image, so 10 s left
    for the last 2 (counting the reused ones in the rate would say 1.25 s per image and 2.5 s left)."""
    import tqdm.std

    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    bar = sampling.image_bar(10, "generate", main=True)
    sampling.count_reused(bar, 6)
    clock[0] += 10
    bar.update(2)
    meter = bar.format_meter(**bar.format_dict)
    bar.close()
    assert re.search(r"8/10 \[00:10<00:10, +5\.00s/image\]", meter), meter


def test_every_process_discards_the_cache_and_on_a_shared_disk_the_first_wins(tmp_path):
    mine, theirs = ImageCache(tmp_path / "key"), ImageCache(tmp_path / "key")  # two processes, one disk
    mine.put("0000_00.png", b"png")
    mine.discard()
    theirs.discard()  # already gone: nothing to do, nothing left behind
    assert list(tmp_path.iterdir()) == []
