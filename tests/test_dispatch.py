"""The dispatch layer: backend modules with one function set, path decisions made from the
arguments alone, and no import cycle between the modules."""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import itertools
import pkgutil
import subprocess
import sys

import pytest
import torch

import msattn
from msattn import backends, dispatch

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@functools.lru_cache(maxsize=None)
def _modules() -> tuple[str, ...]:
    names = ["msattn"]
    for info in pkgutil.walk_packages(msattn.__path__, "msattn."):
        names.append(info.name)
    return tuple(sorted(names))


def _module_imports(name: str) -> set[str]:
    """msattn modules that module ``name`` imports, at module level or deferred inside a function
    (a deferred import that closes a cycle still is one)."""
    spec = importlib.util.find_spec(name)
    tree = ast.parse(open(spec.origin).read())
    package = name if spec.submodule_search_locations else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found & set(_modules())


def test_no_import_cycle():
    """The import graph of msattn's modules is acyclic."""
    modules = _modules()
    graph = {name: _module_imports(name) - {name} for name in modules}
    state = {}

    def visit(name, stack):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join([*stack, name])
        state[name] = "open"
        for other in sorted(graph.get(name, ())):
            if other in graph and other != "msattn" and not name.startswith(other + "."):
                visit(other, [*stack, name])
        state[name] = "done"

    for name in modules:
        visit(name, [])


def test_every_module_imports_in_any_order():
    """Every module imports in alphabetical and in reverse order in fresh interpreters."""
    modules = [m for m in _modules() if not m.startswith("msattn.integrations")
               or _has_transformers()]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    for order in (modules, modules[::-1]):
        subprocess.run([sys.executable, "-c", script, *order], check=True)


def _has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def test_ops_never_import_the_dispatch_layer():
    import msattn.ops as ops
    for info in pkgutil.iter_modules(ops.__path__):
        imported = _module_imports(f"msattn.ops.{info.name}")
        assert not {"msattn.dispatch", "msattn.interface", "msattn.paged"} & imported, info.name


def test_backend_modules_have_one_function_set():
    signatures = {}
    for backend in dispatch.REGISTRY.values():
        module = backend.load()
        for name in backends.FUNCTIONS:
            function = getattr(module, name)
            params = [p for p in inspect.signature(function).parameters.values()
                      if p.kind != p.VAR_KEYWORD]
            signatures.setdefault(name, {})[backend.name] = [p.name for p in params]
    for name, by_backend in signatures.items():
        first, *rest = by_backend.values()
        assert all(names == first for names in rest), (name, by_backend)


def test_resolve():
    assert dispatch.resolve("reference", CPU) is dispatch.REFERENCE
    assert dispatch.resolve("auto", CPU) is dispatch.REFERENCE  # the interpreter is never auto
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve("cuda", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve(None, CPU)


def test_kernel_limits_fall_back_to_reference_with_a_reason():
    if not dispatch.TRITON.available(CPU):
        pytest.skip("needs TRITON_INTERPRET=1 and triton")
    path = dispatch.select_path("triton", CPU, block_size=8, index_dim=32)
    assert path.select == "reference" and "below 16" in path.reason
    path = dispatch.sparse_attention_path("triton", CPU, block_size=32, head_dim=8)
    assert path.attention == "reference" and "below 16" in path.reason
    assert dispatch.select_path("triton", CPU, block_size=16, index_dim=16) == dispatch.Path("triton", "triton")
    for q_len, attention in ((1, "triton-decode"), (16, "triton-decode"), (17, "triton")):
        path = dispatch.paged_path("triton", CPU, page_size=16, index_dim=16, head_dim=32,
                                   max_seqlen_q=q_len)
        assert path == dispatch.Path("triton", attention)
    path = dispatch.paged_path("triton", CPU, page_size=8, index_dim=16, head_dim=32, max_seqlen_q=1)
    assert path.attention == "reference"


def test_dense_path_needs_lengths_and_is_exact_only_up_to_topk_blocks(monkeypatch):
    monkeypatch.setattr(dispatch.dense, "available", lambda device, dtype, head_dim: True)
    kwargs = dict(block_size=16, topk=4, head_dim=32, index_dim=16)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        dispatch.attention_path("auto", CUDA, torch.bfloat16, max_seqlen_k=None, **kwargs)
    assert dispatch.attention_path("auto", CUDA, torch.bfloat16, max_seqlen_k=64,
                                   **kwargs).attention == "dense"
    for backend, length in itertools.product(("auto", "reference"), (65, 1000)):
        path = dispatch.attention_path(backend, CPU, torch.bfloat16, max_seqlen_k=length, **kwargs)
        assert path.attention == "reference"


def test_varlen_call_with_max_seqlen_does_not_read_cu_seqlens(monkeypatch):
    """Given max_seqlen_q/k, the public functions check only metadata: the cu_seqlens values are
    never read back (no host sync), so even bad values pass the checks."""
    gen = torch.Generator().manual_seed(0)
    qi, ki = torch.randn(10, 2, 16, generator=gen), torch.randn(30, 16, generator=gen)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 12, 30], dtype=torch.int32)
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or original(self))
    seen = []

    def fake_select(qi, ki, cu_q, cu_k, **kwargs):
        seen.append((kwargs["max_seqlen_q"], kwargs["max_seqlen_k"]))
        return torch.zeros(qi.shape[1], qi.shape[0], kwargs["topk"], dtype=torch.int32)

    monkeypatch.setattr(dispatch.REFERENCE.load(), "select_blocks", fake_select)
    msattn.msa_select(qi, ki, block_size=16, topk=2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                      max_seqlen_q=6, max_seqlen_k=18)
    assert reads == [] and seen == [(6, 18)]
    msattn.msa_select(qi, ki, block_size=16, topk=2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert reads and seen[-1] == (6, 18)  # read back and checked without them
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        msattn.msa_select(qi, ki, block_size=16, topk=2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=6.0, max_seqlen_k=18)
