"""A training data stream that is a pure function of (seed, position), so that resume is exact.

fast-reid's training loader draws its sampler indices from numpy's *global* generator and its
augmentations from whatever state the global Python/numpy/torch generators (or the data-loader
workers' fresh seeds) happen to have. A resumed run therefore replays the stream from its seed
and differs from the uninterrupted run. Here:

* :class:`StreamSampler` wraps any of fast-reid's infinite samplers: it pulls indices with the
  global generators swapped for the sampler's own, numbers every index with its position in the
  stream, and can start at any position (it fast-forwards the index stream, which is cheap: no
  image is read).
* :class:`SeededDataset` seeds Python, numpy and torch from ``(seed, rank, position)`` before it
  loads and augments each sample, and, in the main process, puts the caller's generator states
  back afterwards. A sample is then the same whether it is loaded in the main process or in any
  worker, before or after a resume, and loading never disturbs the model's random numbers.
"""

import random

import numpy as np
import torch
from torch.utils.data import Sampler, get_worker_info

#: Tags that keep the seeds of different purposes apart.
SAMPLE_TAG, EPOCH_TAG, SAMPLER_TAG = 1, 2, 3


def derive_seed(*key):
    """A 32-bit seed from a tuple of non-negative integers (numpy's SeedSequence mixing).

    Args:
        *key (int): e.g. ``(base_seed, tag, rank, position)``.
    Returns:
        int
    """
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


class _GlobalRNGState:
    """Snapshot of the global Python, numpy and torch (CPU) generators."""

    def __init__(self):
        self.py = random.getstate()
        self.np = np.random.get_state()
        self.torch = torch.random.get_rng_state()

    def restore(self):
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.random.set_rng_state(self.torch)


def seed_global_rngs(seed):
    """Seed the global Python, numpy and torch CPU generators (not CUDA's).

    Args:
        seed (int): 32-bit seed.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)


class StreamSampler(Sampler):
    """Wrap an infinite fast-reid sampler into a positioned, isolated, resumable stream.

    Yields ``(index, position)`` pairs, ``position`` counting this rank's samples from 0.

    Args:
        sampler (Sampler): a fast-reid training sampler (``TrainingSampler``,
            ``NaiveIdentitySampler``, ...). Its ``_seed`` is replaced by ``seed``.
        seed (int): the stream's seed, the same on every rank (the samplers split one stream
            between ranks).
        chunk (int): indices pulled per swap of the generator states.
    """

    def __init__(self, sampler, seed, chunk=256):
        self.sampler = sampler
        self.seed = int(seed)
        self.start = 0
        self.chunk = int(chunk)

    def set_start(self, position):
        """Start the next iteration at ``position`` (samples this rank has already consumed).

        Args:
            position (int)
        """
        if position < 0:
            raise ValueError(f"stream position must be >= 0, got {position}")
        self.start = int(position)

    def __iter__(self):
        if hasattr(self.sampler, "_seed"):
            self.sampler._seed = self.seed
        inner = iter(self.sampler)
        # The sampler's own generator states, swapped in around every pull (fast-reid's samplers
        # also seed numpy's global generator themselves when their generator starts).
        caller = _GlobalRNGState()
        seed_global_rngs(derive_seed(self.seed, SAMPLER_TAG))
        own = _GlobalRNGState()
        caller.restore()
        position = 0
        skip = self.start
        while True:
            caller = _GlobalRNGState()
            own.restore()
            try:
                while skip > 0:  # fast-forward without reading any image
                    next(inner)
                    skip -= 1
                    position += 1
                buffer = [next(inner) for _ in range(self.chunk)]
            finally:
                own = _GlobalRNGState()
                caller.restore()
            for index in buffer:
                yield int(index), position
                position += 1

    def __len__(self):  # infinite, as fast-reid's samplers
        raise TypeError("StreamSampler is infinite")


class SeededDataset(torch.utils.data.Dataset):
    """A dataset whose item ``(index, position)`` is loaded under a seed of its own.

    Other attributes (``num_classes``, ``img_items``, ...) are those of the wrapped dataset.

    Args:
        dataset (Dataset): e.g. fast-reid's ``CommDataset``.
        seed (int): the run's data seed.
        rank (int): this process's rank (its stream positions are its own).
    """

    def __init__(self, dataset, seed, rank=0):
        self.dataset = dataset
        self.seed = int(seed)
        self.rank = int(rank)

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item):
        if not isinstance(item, tuple):  # a plain index, e.g. from another sampler
            return self.dataset[item]
        index, position = item
        in_worker = get_worker_info() is not None
        caller = None if in_worker else _GlobalRNGState()
        seed_global_rngs(derive_seed(self.seed, SAMPLE_TAG, self.rank, position))
        try:
            return self.dataset[index]
        finally:
            if caller is not None:
                caller.restore()


class _LazyIterator:
    """Creates the loader's iterator at the first ``next``, so that a resumed trainer can move
    the stream to its position first (and no worker starts before it is needed)."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self.loader)
        return next(self._it)


class DeferredLoader:
    """An iterable over ``loader`` whose iterators are :class:`_LazyIterator` objects.

    Args:
        loader (DataLoader)
    """

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return _LazyIterator(self.loader)


def run_seed(cfg):
    """The run's data seed: ``REIDZOO.SEED`` if set (>= 0), else one random seed shared by all
    ranks. A resumed run takes the seed stored in its checkpoint instead.

    Args:
        cfg (CfgNode)
    Returns:
        int
    """
    from fastreid.utils import comm

    if cfg.REIDZOO.SEED >= 0:
        return int(cfg.REIDZOO.SEED)
    return int(comm.shared_random_seed())


def build_stream_train_loader(cfg, train_set, transforms=None):
    """fast-reid's training loader (its ``DATALOADER.SAMPLER_TRAIN`` sampler, P x K batches,
    ``fast_batch_collator``) over a positioned, seeded stream.

    Args:
        cfg (CfgNode)
        train_set (Dataset): e.g. ``CommDataset(items, transforms, relabel=True)``.
        transforms: passed to fast-reid's loader configuration (unused when train_set is given).
    Returns:
        DataLoader: ``loader.dataset`` is a :class:`SeededDataset`,
        ``loader.batch_sampler.sampler`` a :class:`StreamSampler`.
    """
    from fastreid.data.build import _train_loader_from_config, fast_batch_collator
    from fastreid.data.data_utils import DataLoaderX
    from fastreid.utils import comm

    seed = run_seed(cfg)
    conf = _train_loader_from_config(cfg, train_set=train_set, transforms=transforms)
    sampler = StreamSampler(conf["sampler"], seed)
    mini_batch_size = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    batch_sampler = torch.utils.data.BatchSampler(sampler, mini_batch_size, drop_last=True)
    return DataLoaderX(
        comm.get_local_rank(),
        dataset=SeededDataset(train_set, seed, comm.get_rank()),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        batch_sampler=batch_sampler,
        collate_fn=fast_batch_collator,
        pin_memory=True,
        # The loader's own generator: creating an iterator never draws from torch's global one.
        generator=torch.Generator().manual_seed(seed),
    )


def stream_of(loader):
    """The :class:`StreamSampler` and :class:`SeededDataset` of a loader built by
    :func:`build_stream_train_loader`, or ``(None, None)`` for any other loader."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    dataset = getattr(loader, "dataset", None)
    if isinstance(sampler, StreamSampler) and isinstance(dataset, SeededDataset):
        return sampler, dataset
    return None, None
