"""Offline data for the demo and the tests: scikit-learn's bundled digits, the standard library's
docstrings, Fashion-MNIST where the Debian package is installed, and generated tasks."""

from __future__ import annotations

import torch


def digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits (1,797 real images shipped with the package), as
    ``(x_train, y_train, x_test, y_test)`` with ``x`` of shape ``[n, 1, 8, 8]`` scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install 'quanta[demo]'") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def sine_sequences(n: int = 2000, length: int = 24, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy sinusoids; the class is the frequency. ``x``: ``[n, length, 1]``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    t = torch.arange(length, dtype=torch.float32)
    freq = 0.15 + 0.12 * y.float()
    phase = torch.rand(n, generator=g) * 6.283
    x = torch.sin(freq[:, None] * t[None, :] + phase[:, None]) + 0.3 * torch.randn(n, length, generator=g)
    return x.unsqueeze(-1), y


def majority_tokens(n: int = 2000, length: int = 16, vocab: int = 12, classes: int = 4,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated language: random tokens with one of ``classes`` marker tokens planted
    more often than the others; the class is the most frequent marker."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(classes, vocab, (n, length), generator=g)
    noise = torch.randint(0, classes, (n, length), generator=g)
    use_noise = torch.rand(n, length, generator=g) < 0.25
    x = torch.where(use_noise, noise, x)
    plant = torch.rand(n, length, generator=g) < 0.3
    x = torch.where(plant, y[:, None].expand(-1, length), x)
    return x, y


#: standard-library modules whose docstring lines the text task classifies (one class each)
DOCSTRING_MODULES = ("argparse", "asyncio", "collections", "logging", "os", "pathlib", "re", "subprocess",
                     "tarfile", "typing", "unittest", "zipfile")


def _docstring_lines(module_name: str, min_chars: int) -> set[str]:
    import importlib
    import warnings

    with warnings.catch_warnings():  # (typing.io and the like warn when touched)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _lines_of(importlib.import_module(module_name), module_name, min_chars)


def _lines_of(module: object, module_name: str, min_chars: int) -> set[str]:
    import inspect

    objects: list[object] = [module]
    for name in dir(module):
        if not name.startswith("_"):
            obj = getattr(module, name)
            objects.append(obj)
            if inspect.isclass(obj):
                objects += [v for k, v in vars(obj).items() if not k.startswith("_") and callable(v)]
    lines: set[str] = set()
    for obj in objects:
        owner = module_name if obj is module else (getattr(obj, "__module__", None) or "")
        if owner.split(".")[0] != module_name.split(".")[0]:
            continue  # documented elsewhere (imported names, builtins)
        lines |= {s.strip() for s in (inspect.getdoc(obj) or "").splitlines() if len(s.strip()) >= min_chars}
    return lines


def stdlib_docstrings(length: int = 32, vocab: int = 4096, min_chars: int = 24, per_class: int = 300,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Real English text found on every Python install: lines of the docstrings of
    `DOCSTRING_MODULES`, labelled with the module they come from. Returns ``(tokens, labels,
    module names)``: ``tokens`` ``[n, length]`` word ids (lower-cased words and punctuation; the
    ``vocab - 2`` most frequent get their own id, 1 is any other word, 0 pads), ``labels``
    ``[n]``. At most ``per_class`` lines per module, chosen with ``seed``; the vocabulary is
    built from the words alone (no labels), so it is the same for every split."""
    import collections
    import re

    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for label, name in enumerate(DOCSTRING_MODULES):
        lines = sorted(_docstring_lines(name, min_chars))
        for i in torch.randperm(len(lines), generator=g)[:per_class].tolist():
            texts.append(re.findall(r"[a-z0-9_]+|[^\sa-z0-9_]", lines[i].lower()))
            labels.append(label)
    counts = collections.Counter(w for words in texts for w in words)
    ids = {w: i + 2 for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab - 2])}
    rows = [[ids.get(w, 1) for w in words[:length]] + [0] * max(0, length - len(words)) for words in texts]
    order = torch.randperm(len(labels), generator=g)
    return torch.tensor(rows, dtype=torch.long)[order], torch.tensor(labels)[order], DOCSTRING_MODULES


#: where the Debian package ``dataset-fashion-mnist`` puts the data (its ``*-ubyte.gz`` files)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_mnist(root: str = FASHION_MNIST_DIR, train_images: int = 6000) -> tuple[torch.Tensor, ...] | None:
    """Fashion-MNIST as ``(x_train, y_train, x_test, y_test)`` (``x``: ``[n, 1, 28, 28]`` in
    [0, 1]; the first ``train_images`` training images, the full 10,000 test set), or ``None``
    when the files are not installed (``apt-get install dataset-fashion-mnist``)."""
    import gzip
    import os

    def read(name: str, header: int) -> torch.Tensor | None:
        for path in (os.path.join(root, name), os.path.join(root, name + ".gz")):
            if os.path.exists(path):
                with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                    return torch.frombuffer(bytearray(f.read()[header:]), dtype=torch.uint8)
        return None

    parts = [read(f"{s}-images-idx3-ubyte", 16) for s in ("train", "t10k")]
    labels = [read(f"{s}-labels-idx1-ubyte", 8) for s in ("train", "t10k")]
    if any(p is None for p in parts + labels):
        return None
    xtr, xte = (p.reshape(-1, 1, 28, 28).float() / 255.0 for p in parts)  # type: ignore[union-attr]
    ytr, yte = (y.long() for y in labels)  # type: ignore[union-attr]
    return xtr[:train_images], ytr[:train_images], xte, yte
