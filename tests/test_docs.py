"""Every example the documentation shows runs, as written.

- Docstring examples (``>>>``) of dyt_kernels (integrations included), models/, training/ and bench/,
  one case per docstring, run by the standard ``doctest`` module; a docstring whose examples import an
  optional dependency that is not installed is skipped (importorskip).
- The ``Example::`` literal block of ``dyt_parameter_names`` (the Trainer override README points to).
- Every ```python block of README.md and docs/*.md, each in its own Python process on the CPU. A block
  that names things the reader supplies gets tiny stand-ins (STANDINS, by the block's first line,
  each saying why) and checks of what the block promises; a block that cannot run on a CPU is listed
  in SKIPPED with the reason. Any other block runs exactly as written, so a new block that fails and
  is in neither list fails here.
- The commands README and docs/*.md show: each ``python -m <module>`` / ``python <script>`` (and
  ``torchrun ... <script>``) of this project exists, its ``--help`` exits 0 and lists every flag the
  command line uses; the extras of ``pip install -e ".[extra]"`` exist in setup.py. Nothing trains or
  benchmarks: ``--help`` only.

The processes (README blocks, ``--help`` commands) start together the first time one is needed, a few
at a time, so the file takes about half a minute rather than the sum of its interpreter start-ups.
"""
from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dyt_kernels", "models", "training", "bench")
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Third-party packages the project uses only optionally (extras); a docstring or module importing
# one that is missing is skipped, not failed. Anything else an example imports must be there.
OPTIONAL = {"diffusers", "transformers", "timm", "peft", "accelerate", "scipy", "matplotlib", "mlxtend",
            "yaml", "einops", "torchvision", "tqdm", "safetensors", "onnx", "onnxruntime", "onnxscript"}
TIMEOUT = 240


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------------
# Docstring examples
# ---------------------------------------------------------------------------------------------------

def _module_files():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name == "__main__.py":   # importing it is running the command; --help covers it
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _docstrings_with_examples(tree: ast.Module, modname: str):
    """(doctest's name for the object, its docstring) for each docstring with a >>> line, found in the
    source without importing it: the module, its classes and functions, and classes' members, as
    DocTestFinder names them."""
    def walk(node, prefix):
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child, clean=False)
                if doc and ">>>" in doc:
                    yield name
                if isinstance(child, ast.ClassDef):
                    yield from walk(child, name)
    doc = ast.get_docstring(tree, clean=False)
    if doc and ">>>" in doc:
        yield modname
    yield from walk(tree, modname)


def _top_level_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _module_level_imports(path: Path) -> set[str]:
    """Imports a module runs when it is imported (not those inside functions or try blocks)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= _top_level_imports(ast.unparse(node))
    return names


DOCSTRING_CASES = [(mod, name, path) for mod, path in _module_files()
                   for name in _docstrings_with_examples(ast.parse(path.read_text()), mod)]
MODULES = sorted({(mod, path) for mod, _, path in DOCSTRING_CASES})


def _import_for_doctest(modname: str, path: Path):
    for dep in sorted(_module_level_imports(path) & OPTIONAL):
        pytest.importorskip(dep, reason=f"{modname} imports {dep}, an optional dependency")
    return importlib.import_module(modname)


def test_docstring_examples_were_found():
    # The examples the library's docs rely on; finding none would make every case below vacuous.
    names = {name for _, name, _ in DOCSTRING_CASES}
    assert len(DOCSTRING_CASES) >= 30, names
    for expected in ("dyt_kernels.functional.dyt", "dyt_kernels.modules.DyT", "dyt_kernels.convert.convert_layernorm_to_dyt",
                     "dyt_kernels.integrations.diffusers.fuse_modulation", "models", "training.diffusion.DDPM"):
        assert expected in names


@pytest.mark.parametrize("modname,path", MODULES, ids=[m for m, _ in MODULES])
def test_source_scan_finds_what_doctest_finds(modname, path):
    """The cases are named from the source; doctest, given the imported module, must find the same set
    (else an example would silently go unrun)."""
    module = _import_for_doctest(modname, path)
    found = {t.name for t in doctest.DocTestFinder().find(module, modname) if t.examples}
    assert found == {name for mod, name, _ in DOCSTRING_CASES if mod == modname}


@pytest.mark.parametrize("modname,name,path", DOCSTRING_CASES, ids=[c[1] for c in DOCSTRING_CASES])
def test_docstring_example(modname, name, path):
    module = _import_for_doctest(modname, path)
    tests = [t for t in doctest.DocTestFinder().find(module, modname) if t.name == name]
    assert len(tests) == 1, f"doctest finds {len(tests)} docstrings named {name}"
    test = tests[0]
    for dep in sorted(_top_level_imports("\n".join(e.source for e in test.examples)) & OPTIONAL):
        pytest.importorskip(dep, reason=f"the example imports {dep}, an optional dependency")
    out = io.StringIO()
    runner = doctest.DocTestRunner(verbose=False)   # default flags: the output must match as shown
    try:
        result = runner.run(test, out=out.write, clear_globs=True)
    finally:
        test.globs.clear()
    assert result.attempted == len(test.examples) > 0
    assert result.failed == 0, f"{name} ({_rel(path)}):\n{out.getvalue()}"


def _trainer_script() -> str:
    from dyt_kernels import dyt_parameter_names
    snippet = dyt_parameter_names.__doc__.split("::\n", 1)[1].split(">>>", 1)[0]
    assert "class DyTTrainer(transformers.Trainer)" in snippet, snippet
    return ("import torch, transformers\n"
            "from dyt_kernels import convert_layernorm_to_dyt, dyt_parameter_names\n"
            + _snippet_exec(snippet, "dyt_kernels/modules.py (dyt_parameter_names)") +
            # Stand-in: a tiny GPT-2, whose ln_1 / ln_2 / ln_f names Trainer's name patterns miss.
            "config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=8,\n"
            "                                 bos_token_id=0, eos_token_id=0)\n"
            "model = convert_layernorm_to_dyt(transformers.GPT2LMHeadModel(config))\n"
            "trainer = object.__new__(DyTTrainer)   # the method reads nothing else of the Trainer\n"
            "dyt = set(dyt_parameter_names(model))\n"
            "plain = transformers.Trainer.get_decay_parameter_names(trainer, model)\n"
            "ours = trainer.get_decay_parameter_names(model)\n"
            "assert {'transformer.h.0.ln_1.alpha', 'transformer.h.0.ln_1.weight', 'transformer.ln_f.alpha'} <= dyt\n"
            "assert dyt & set(plain), 'Trainer no longer decays DyT parameters: the docstring is stale'\n"
            "assert ours == [n for n in plain if n not in dyt] and ours, ours\n")


def test_dyt_parameter_names_trainer_example():
    """The Trainer subclass dyt_parameter_names' docstring shows (and README's weight-decay section
    points to) leaves a converted GPT-2's DyT parameters out of weight decay, which Trainer's own
    rule does not."""
    pytest.importorskip("transformers")
    result = _jobs().result(("script", _trainer_script()))
    assert result.returncode == 0, result.stderr[-4000:]


def _snippet_exec(source: str, filename: str, first_line: int = 1) -> str:
    """Python source that runs ``source`` at module level, its tracebacks naming ``filename`` and the
    documentation's line numbers."""
    padded = "\n" * (first_line - 1) + textwrap.dedent(source)
    return f"exec(compile({padded!r}, {filename!r}, 'exec'), globals())\n"


# ---------------------------------------------------------------------------------------------------
# Python blocks of README.md and docs/*.md
# ---------------------------------------------------------------------------------------------------

def _python_blocks():
    """(file, line of the block's first code line, first code line, source) of each ```python block."""
    blocks = []
    for path in DOC_FILES:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"\s*```\s*(\w*)", lines[i])
            if not m:
                i += 1
                continue
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            if m.group(1).lower() in ("python", "py", "python3"):
                body = lines[i + 1:j]
                first = next((s.strip() for s in body if s.strip()), "")
                blocks.append((path, i + 2, first, "\n".join(body) + "\n"))
            i = j + 1
    return blocks


BLOCKS = _python_blocks()

# Blocks that refer to things the reader supplies: (packages the stand-ins need, code run before the
# block, checks run after it), keyed by the block's first line.
STANDINS = {
    # "The library": runs as written; the checks hold it to what its comments say.
    "import torch": (
        (),
        "",
        "assert y.shape == x.shape == h.shape == r.shape\n"
        "assert torch.allclose(y, torch.tanh(0.5 * x))\n"
        "assert torch.allclose(r, stream + gate[:, None] * branch, atol=1e-6)\n"
        "assert type(layer.norm1).__name__ == type(layer.norm2).__name__ == 'DyT'\n"
        "assert out.shape == x.shape and torch.isfinite(out).all()\n",
    ),
    # "Converting models you did not write": build_model() and layernorm_checkpoint are the reader's
    # model and its pretrained LayerNorm weights. Stand-in: a tiny diffusers DiT (LayerNorms and
    # AdaLayerNormZero, so fuse_modulation=True has something to fuse) and the state dict of another
    # instance of it, standing for the checkpoint.
    "import logging, torch": (
        ("diffusers",),
        "import torch\n"
        "from diffusers import DiTTransformer2DModel\n"
        "def build_model():\n"
        "    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,\n"
        "                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10)\n"
        "torch.manual_seed(1)\n"
        "layernorm_checkpoint = {k: v.clone() for k, v in build_model().state_dict().items()}\n"
        "torch.manual_seed(0)\n",
        "from dyt_kernels import DyT\n"
        "dyts = [m for m in model.modules() if isinstance(m, DyT)]\n"
        "assert dyts and not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules()), model\n"
        "assert 'Fused' in type(model.transformer_blocks[0]).__name__, type(model.transformer_blocks[0])\n"
        "state = model.state_dict()   # the checkpoint's values survived the conversion\n"
        "assert all(torch.equal(state[k], v) for k, v in layernorm_checkpoint.items()), 'checkpoint not loaded'\n"
        "held = {id(p) for g in optimizer.param_groups for p in g['params']}\n"
        "assert held == {id(p) for p in model.parameters()} and all(id(d.alpha) in held for d in dyts), \\\n"
        "    'the optimizer does not hold the converted model parameters'\n",
    ),
    # FLUX's QK-norm start: `flux` is the reader's FLUX transformer, and convert_layernorm_to_dyt comes
    # from the block above's import. Stand-in: a tiny diffusers FluxTransformer2DModel.
    'qk = lambda name, m: name.endswith(("norm_q", "norm_k", "norm_added_q", "norm_added_k"))': (
        ("diffusers",),
        "import torch\n"
        "from diffusers import FluxTransformer2DModel\n"
        "from dyt_kernels import convert_layernorm_to_dyt\n"
        "flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,\n"
        "                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,\n"
        "                              pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))\n",
        "from dyt_kernels import DyT\n"
        "dyts = {n: m for n, m in flux.named_modules() if isinstance(m, DyT)}\n"
        "qks = [n for n in dyts if qk(n, None)]\n"
        "assert len(qks) == 6, qks   # norm_q/k and norm_added_q/k of the double block, norm_q/k of the single\n"
        "for n, m in dyts.items():\n"
        "    if n in qks:\n"
        "        assert m.alpha.item() == 4.0 and bool((m.weight == 2.0).all()), n\n"
        "    else:\n"
        "        assert m.alpha.item() == 0.5, n\n",
    ),
}
# Blocks that cannot run on a CPU (they need CUDA), by first line, with the reason. None today.
SKIPPED: dict[str, str] = {}


def _block_script(path, line, first, source):
    needs, prelude, checks = STANDINS.get(first, ((), "", ""))
    return needs, (prelude + _snippet_exec(source, _rel(path), line) + checks)


def test_standins_and_skips_name_existing_blocks():
    firsts = [first for _, _, first, _ in BLOCKS]
    assert len(firsts) == len(set(firsts)), f"two blocks start with the same line; key them apart: {firsts}"
    assert set(STANDINS) <= set(firsts), set(STANDINS) - set(firsts)
    assert set(SKIPPED) <= set(firsts), set(SKIPPED) - set(firsts)
    assert not set(STANDINS) & set(SKIPPED)
    assert any(path.name == "README.md" for path, _, _, _ in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{_rel(b[0])}:{b[1]}" for b in BLOCKS])
def test_doc_python_block_runs(block):
    path, line, first, source = block
    if first in SKIPPED:
        pytest.skip(SKIPPED[first])
    needs, script = _block_script(*block)
    for dep in needs:
        pytest.importorskip(dep, reason=f"the stand-in for {_rel(path)}:{line} needs {dep}")
    result = _jobs().result(("block", script))
    assert result.returncode == 0, (f"{_rel(path)}:{line} (first line {first!r}) failed:\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    if first == "import logging, torch":   # print(conversion_report(...)) and the INFO log reached the user
        assert "LayerNorm" in result.stdout, result.stdout
        assert "dyt_kernels.convert" in result.stderr, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------

NOT_OURS = {"venv", "pip", "pytest"}   # python -m of tools, not of this project
# train_mnist.py trains when no command is given ("plain flags mean train"), so its flags are train's.
DEFAULT_SUBCOMMAND = {"train_mnist.py": ("train",)}


def _command_lines():
    """(file, command) for each shell line of a ```bash block and each inline `python ...` span."""
    out = []
    for path in DOC_FILES:
        text = path.read_text()
        for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S):
            for line in block.splitlines():
                out.append((path, line))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        out += [(path, " ".join(m.split())) for m in re.findall(r"`((?:python3?|torchrun)\s[^`]+)`", prose)]
    return out


def _commands():
    """{(target, subcommands): {flags}} of the project's python commands, and the pip extras named."""
    commands: dict[tuple, set] = {}
    extras: set[str] = set()
    for path, line in _command_lines():
        for segment in re.split(r"&&|;|\|", line):
            try:
                tokens = shlex.split(segment, comments=True)
            except ValueError:
                tokens = segment.split()
            if tokens[:3] == ["pip", "install", "-e"] and len(tokens) > 3:
                extras |= set(re.findall(r"\[([^\]]+)\]", tokens[3])[0].split(",")) if "[" in tokens[3] else set()
                continue
            if tokens[:1] in (["python"], ["python3"]):
                rest = tokens[1:]
                if rest[:1] == ["-m"]:
                    if len(rest) < 2 or rest[1].split(".")[0] in NOT_OURS:
                        continue
                    target, rest = ("-m", rest[1]), rest[2:]
                elif rest and rest[0].endswith(".py"):
                    target, rest = (rest[0],), rest[1:]
                else:
                    continue
            elif tokens[:1] == ["torchrun"]:
                at = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
                target, rest = (tokens[at],), tokens[at + 1:]
            else:
                continue
            subs = []
            for t in rest:
                if t.startswith("-"):
                    break
                if not t.startswith("[") and t not in ("...", "…"):
                    subs.append(t)
            subs = tuple(subs) or DEFAULT_SUBCOMMAND.get(target[-1], ())
            flags = {t.split("=")[0] for t in rest if t.startswith("--")}
            commands.setdefault((target, subs), set()).update(flags)
    return commands, extras


COMMANDS, EXTRAS = _commands()
COMMAND_CASES = sorted(COMMANDS.items())


def test_commands_were_found():
    targets = {target for (target, _), _ in COMMAND_CASES}
    assert {("train_mnist.py",), ("-m", "bench"), ("-m", "dyt_kernels.inspect"), ("-m", "bench.predict")} <= targets
    assert {"train", "dev"} <= EXTRAS


def test_pip_extras_exist():
    tree = ast.parse((ROOT / "setup.py").read_text())
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            keys = {k.value for k in node.value.keys}
    assert EXTRAS and EXTRAS <= keys, f"README installs extras {sorted(EXTRAS)}; setup.py has {sorted(keys)}"


def _help_argv(target, subs):
    return [*target, *subs, "--help"]


# README names the model benchmark as `bench models`, not as a `python -m bench models` command line.
EXTRA_HELPS = [(("-m", "bench"), ("models",))]
HELP_ARGVS = json.dumps([_help_argv(target, subs) for (target, subs), _ in COMMAND_CASES]
                        + [_help_argv(target, subs) for target, subs in EXTRA_HELPS])

# Runs each `python <argv>` in one fresh process, as the interpreter would (runpy, __main__, sys.argv),
# so the project is imported once for all of them; prints {argv: [exit code, stdout, stderr]} as JSON.
HELP_DRIVER = """
import contextlib, io, json, runpy, sys, traceback
results = {}
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [argv[1] if argv[0] == "-m" else argv[0], *argv[(2 if argv[0] == "-m" else 1):]]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if argv[0] == "-m":
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[" ".join(argv)] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


@pytest.mark.parametrize("command,flags", COMMAND_CASES,
                         ids=[" ".join(target + subs) for (target, subs), _ in COMMAND_CASES])
def test_command_help(command, flags):
    target, subs = command
    if target[0] == "-m":
        spec = importlib.util.find_spec(target[1])
        assert spec is not None and spec.origin and Path(spec.origin).is_relative_to(ROOT), \
            f"python -m {target[1]}: no such module in the project"
    else:
        assert (ROOT / target[0]).is_file(), f"python {target[0]}: no such script"
    helps = _jobs().result(("helps", HELP_ARGVS))
    assert helps.returncode == 0 and helps.stdout.strip(), helps.stderr[-3000:]
    code, stdout, stderr = json.loads(helps.stdout.strip().splitlines()[-1])[" ".join(_help_argv(target, subs))]
    shown = " ".join(target + subs)
    assert code == 0, f"python {shown} --help exited {code}:\n{stderr[-3000:]}"
    assert "usage" in stdout.lower(), stdout
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", stdout))
    assert not missing, f"the docs use {missing} with `python {shown}`, which its --help does not list"


# ---------------------------------------------------------------------------------------------------
# Subprocesses, started together
# ---------------------------------------------------------------------------------------------------

class _Jobs:
    """Every subprocess this file needs, started on first use a few at a time (interpreter start-up
    and imports are most of each one's time)."""

    def __init__(self):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT),
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        env.pop("DYT_KERNELS_BACKEND", None)
        self.env = env
        self.pool = ThreadPoolExecutor(max_workers=3)
        self.futures = {}
        self.lock = threading.Lock()

    def _run(self, key):
        kind, payload = key
        argv = [sys.executable, "-c", HELP_DRIVER, payload] if kind == "helps" else [sys.executable, "-c", payload]
        return subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=TIMEOUT)

    def start(self, keys):
        with self.lock:
            for key in keys:
                if key not in self.futures:
                    self.futures[key] = self.pool.submit(self._run, key)

    def result(self, key):
        self.start([key])
        return self.futures[key].result()


_JOBS = None


def _jobs() -> _Jobs:
    global _JOBS
    if _JOBS is None:
        _JOBS = _Jobs()
        keys = [("helps", HELP_ARGVS)]
        for block in BLOCKS:
            if block[2] not in SKIPPED:
                needs, script = _block_script(*block)
                if all(importlib.util.find_spec(d) for d in needs):
                    keys.append(("block", script))
        if importlib.util.find_spec("transformers"):
            keys.append(("script", _trainer_script()))
        _JOBS.start(keys)
    return _JOBS


def _prose_flags():
    """{--flag: files} for flags in the inline code of README.md and docs/*.md; bad_inputs.md is left
    out: its first column lists bad input on purpose (`--learning-rate 0.1`, a flag that never was)."""
    flags: dict[str, set] = {}
    for path in DOC_FILES:
        if path.name == "bad_inputs.md":
            continue
        prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for span in re.findall(r"`([^`]+)`", prose):
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span):
                flags.setdefault(flag, set()).add(_rel(path))
    return flags


def test_flags_named_in_prose_exist():
    """Every flag the docs' text names (`--num-threads 1`, `--model-override KEY=VALUE`, `--dump DIR`)
    is listed by the --help of one of the project's commands."""
    flags = _prose_flags()
    assert "--model-override" in flags and "--resume" in flags
    helps = _jobs().result(("helps", HELP_ARGVS))
    assert helps.returncode == 0 and helps.stdout.strip(), helps.stderr[-3000:]
    results = json.loads(helps.stdout.strip().splitlines()[-1])
    text = "\n".join(out for _, out, _ in results.values())   # each --help's own exit: test_command_help
    missing = {f: sorted(files) for f, files in flags.items()
               if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)}
    assert not missing, f"flags the docs name that no command lists: {missing}"
