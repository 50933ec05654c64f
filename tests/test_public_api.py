"""The package and the shipped model files use the public interfaces of the projects they plug into.

A name with a leading underscore (a private module, function, class, method or attribute) of transformers,
accelerate, peft, lmms-eval or the server's FastAPI/uvicorn may move or change in any release, and users install the
newest release tomorrow. This test lists every such name that the code takes, by reading the source: imports
(`from transformers.x import _y`, `import transformers._x`), attributes of what those imports bound
(`transformers._x`, `Trainer._x`), private members that a subclass of one of their classes overrides, sets, or uses
on `self`/`super()` without defining them itself, private attributes that no code of ours defines read off any other
object (`config._attn_implementation`), strings naming them (`getattr(x, "_y")` on an imported object), and any
`mock.patch` of their objects. Every hit must be in ALLOWED with a one-line reason; an entry that no longer matches
fails too, so the list only shrinks.
"""

import ast
import importlib
import inspect
import textwrap
import types
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("transformers", "accelerate", "peft", "lmms_eval", "fastapi", "starlette", "uvicorn")
SOURCES = sorted([*ROOT.glob("*_crosslmm.py"), ROOT / "convert_checkpoint.py", *(ROOT / "crosslmm").rglob("*.py")])

# Reasons shared by several entries.
DECLARED = (
    "a class attribute every model in transformers declares (capabilities, device_map, tied weights); no public way"
)
HOOK = "a method every model in transformers overrides for this (weight init; beams sharing a sample's inputs)"
CHECKPOINTING = (
    "the one path shared by 5.17's gradient_checkpointing_enable and 5.25's activation_checkpointing_enable"
)
M = "modeling_crosslmm.py: PreTrainedModel."

# "file: what": why it cannot be public (yet). Checked on transformers 5.17-5.25 (.ci/run tests both ends).
ALLOWED: dict[str, str] = {
    **{
        f"{M}{name} (set)": DECLARED
        for name in (
            "_can_compile_fullgraph",
            "_can_record_outputs",
            "_no_split_modules",
            "_skip_keys_device_placement",
            "_supports_attention_backend",
            "_supports_flash_attn",
            "_supports_flex_attn",
            "_supports_sdpa",
            "_tied_weights_keys",
        )
    },
    "modeling_crosslmm.py: DistributedMixin._tp_plan (set)": DECLARED,
    f"{M}_init_weights (overridden)": HOOK,
    "modeling_crosslmm.py: GenerationMixin._expand_inputs_for_generation (overridden)": HOOK,
    f"{M}_set_gradient_checkpointing (overridden)": CHECKPOINTING,
    "modeling_crosslmm.py: <object>._attn_implementation": (
        "config._attn_implementation, the attention backend in force: no public getter"
    ),
    "pipeline_crosslmm.py: transformers.pipelines.any_to_any.AnyToAnyPipeline._sanitize_parameters": (
        "its parameters, which the override leaves to it (read with inspect.signature, so a new one passes through)"
    ),
    "pipeline_crosslmm.py: AnyToAnyPipeline._sanitize_parameters (overridden)": (
        "what transformers' 'Adding a new pipeline' guide tells a custom pipeline to define"
    ),
    "video_processing_crosslmm.py: BaseVideoProcessor._preprocess (overridden)": (
        "what every video processor in transformers overrides: resize and normalise, then the model's layout"
    ),
    "video_processing_crosslmm.py: BaseVideoProcessor._decode_and_sample_videos (overridden)": (
        "no public hook for a video reader of one's own (transformers' default reader needs torchcodec)"
    ),
    "crosslmm/train/trainer.py: Trainer._get_train_sampler (overridden)": (
        "the global-batch length grouping needs its own sampler; get_train_dataloader would rebuild Trainer's loader"
    ),
    "crosslmm/train/trainer.py: Trainer._load_from_checkpoint (overridden)": (
        "LoRA runs only: resume loads lora/trained.safetensors (adapter and gates); other runs are Trainer's own"
    ),
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_theirs(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in PACKAGES


class _Scanner(ast.NodeVisitor):
    """Collects `what` strings for one file: the private names taken from PACKAGES."""

    def __init__(self, module=None):
        self.module = module  # the imported module, whose classes' bases are read from their MRO
        self.found: set[str] = set()
        self.imported: dict[str, str] = {}  # local name -> dotted origin in PACKAGES
        self.foreign: set[str] = set()  # names bound by imports from elsewhere (the standard library, torch, ours)

    def visit_Import(self, node):
        for alias in node.names:
            if not _is_theirs(alias.name):
                self.foreign.add((alias.asname or alias.name).split(".")[0])
            if _is_theirs(alias.name):
                if any(_private(part) for part in alias.name.split(".")):
                    self.found.add(f"import {alias.name}")
                self.imported[(alias.asname or alias.name).split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node):
        if not (node.level == 0 and _is_theirs(node.module)):
            self.foreign.update(alias.asname or alias.name for alias in node.names)
        if node.level == 0 and _is_theirs(node.module):
            for alias in node.names:
                origin = f"{node.module}.{alias.name}"
                if any(_private(part) for part in origin.split(".")):
                    self.found.add(f"from {node.module} import {alias.name}")
                self.imported[alias.asname or alias.name] = origin

    def _origin(self, node) -> str | None:
        """The dotted name in PACKAGES that an expression stands for (a name bound by an import, or an attribute of
        one), else None."""
        if isinstance(node, ast.Name):
            return self.imported.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._origin(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Attribute(self, node):
        base = self._origin(node.value)
        if base and _private(node.attr):
            self.found.add(f"{base}.{node.attr}")
        elif _private(node.attr) and node.attr not in OUR_NAMES and not self._ours_or_foreign(node.value):
            # `config._attn_implementation`, `model._x`: an object that came from somewhere, and no code of ours
            # defines that name, so it is theirs (or the standard library's, named by its module: not counted).
            self.found.add(f"<object>.{node.attr}")
        self.generic_visit(node)

    def _ours_or_foreign(self, node) -> bool:
        """Whether an expression is `self`, `cls` or `super()` (a subclass's members: `_check_subclass`), or rooted
        at a module (or a name imported from one) outside PACKAGES."""
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "super":
            return True
        if isinstance(node, ast.Name) and node.id in ("self", "cls"):
            return True
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id in self.foreign

    def visit_Call(self, node):
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        strings = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        if name in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2 and strings:
            base = self._origin(node.args[0])
            if base and _private(strings[0]):
                self.found.add(f"{base}.{strings[0]}")
        if name in ("patch", "object") and "mock" in ast.unparse(function):
            target = self._origin(node.args[0]) if node.args else None
            text = strings[0] if strings else ""
            if target or _is_theirs(text.split(".")[0] if text else None):
                self.found.add(f"mock.patch {ast.unparse(node.args[0]) if node.args else ''}")
        self.generic_visit(node)

    def visit_ClassDef(self, node):
        if self.module is not None:
            cls = getattr(self.module, node.name, None)
            mro = [c for c in getattr(cls, "__mro__", ())[1:] if c is not object]
            theirs = [c for c in mro if _is_theirs(c.__module__)]
            if theirs:
                self._check_subclass(node, [c for c in mro if c not in theirs], theirs)
        self.generic_visit(node)

    def _check_subclass(self, node, ours, theirs):
        """Private members of their base classes that the subclass overrides, or uses on `self`/`super()` without
        one of our classes defining it (methods, or attributes assigned to `self`)."""
        own = set()
        for tree in [node, *(_class_tree(c) for c in ours)]:
            own |= _members(tree) if tree is not None else set()

        def owner(name: str) -> str:  # the class of theirs that defines `name`, else the first of theirs
            cls = next((c for c in theirs if name in vars(c)), theirs[0])
            return f"{cls.__qualname__}.{name}"

        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(item.name):
                if any(item.name in vars(c) for c in theirs):
                    self.found.add(f"{owner(item.name)} (overridden)")
            targets = item.targets if isinstance(item, ast.Assign) else [getattr(item, "target", None)]
            for target in targets if isinstance(item, (ast.Assign, ast.AnnAssign)) else ():
                if isinstance(target, ast.Name) and _private(target.id) and any(target.id in vars(c) for c in theirs):
                    self.found.add(f"{owner(target.id)} (set)")
        for item in ast.walk(node):
            if not (isinstance(item, ast.Attribute) and _private(item.attr)):
                continue
            receiver = item.value
            via_super = isinstance(receiver, ast.Call) and getattr(receiver.func, "id", None) == "super"
            via_self = isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")
            if (
                via_super or (via_self and item.attr not in own)
            ) and f"{owner(item.attr)} (overridden)" not in self.found:
                self.found.add(owner(item.attr))


def _class_tree(cls) -> ast.ClassDef | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    except (OSError, TypeError):
        return None


def _members(node: ast.ClassDef) -> set[str]:
    """What a class defines: its methods and class attributes, and the attributes its methods assign to `self`."""
    names = {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for item in ast.walk(node):
        targets = item.targets if isinstance(item, ast.Assign) else [getattr(item, "target", None)]
        for target in targets if isinstance(item, (ast.Assign, ast.AnnAssign, ast.AugAssign)) else ():
            if isinstance(target, ast.Name) and item in node.body:
                names.add(target.id)
            if isinstance(target, ast.Attribute) and getattr(target.value, "id", None) in ("self", "cls"):
                names.add(target.attr)
    return names


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    return ".".join(relative.parts).removesuffix(".__init__")


def _defined_names(tree: ast.AST) -> set[str]:
    """Every name a piece of our code defines: functions, classes, assigned names and attributes, parameters."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return names


OUR_NAMES = set().union(*(_defined_names(ast.parse(path.read_text())) for path in SOURCES))


def private_names() -> dict[str, set[str]]:
    """{file relative to the repository: the private names of PACKAGES it takes}."""
    result = {}
    for path in SOURCES:
        try:
            module = importlib.import_module(_module_name(path))
        except ImportError:  # an optional extra that is not installed here (lmms-eval: .ci/run's own environment)
            module = None
        scanner = _Scanner(module)
        scanner.visit(ast.parse(path.read_text(), filename=str(path)))
        if scanner.found:
            result[str(path.relative_to(ROOT))] = scanner.found
    return result


def test_only_allowlisted_private_names_of_other_projects():
    pytest.importorskip("transformers")
    found = {f"{file}: {what}" for file, names in private_names().items() for what in names}
    unexplained = sorted(found - set(ALLOWED))
    stale = sorted(set(ALLOWED) - found)
    assert not unexplained, "private names of other projects, not in ALLOWED:\n" + "\n".join(unexplained)
    assert not stale, "ALLOWED entries that no longer match anything (remove them):\n" + "\n".join(stale)
    assert all(reason.strip() for reason in ALLOWED.values())


def test_the_scanner_finds_what_it_must(tmp_path):
    """The scanner itself, on code that takes private names in each way it looks for."""
    code = """
import transformers._private_module
from transformers.dynamic_module_utils import _hidden
# --- executed from here ---
import transformers
from transformers import Trainer
from unittest import mock
import peft

class MyTrainer(Trainer):
    def _save(self, output_dir=None, state_dict=None):
        return super()._save(output_dir, state_dict)

    def run(self):
        self._helper_of_my_own = 1
        return self._helper_of_my_own, self._train_batch_size

def reach_in(self):
    return peft._internal_thing, getattr(Trainer, "_load_from_checkpoint"), self.config._attn_implementation
def patched():
    with mock.patch.object(transformers, "Trainer"):
        pass
"""
    module = types.ModuleType("scanned")
    exec(code.split("# --- executed from here ---")[1], module.__dict__)  # the first imports name nothing real
    scanner = _Scanner(module)
    scanner.visit(ast.parse(code))
    assert scanner.found == {
        "import transformers._private_module",
        "from transformers.dynamic_module_utils import _hidden",
        "Trainer._save (overridden)",
        "Trainer._train_batch_size",
        "peft._internal_thing",
        "transformers.Trainer._load_from_checkpoint",
        "<object>._attn_implementation",
        "mock.patch transformers",
    }


def test_a_transformers_release_outside_the_tested_ones_is_named_in_one_line(monkeypatch, capsys):
    from importlib.metadata import version

    from crosslmm import versions

    installed = version("transformers")
    monkeypatch.delenv("CROSSLMM_NO_VERSION_WARNING")
    monkeypatch.setitem(versions.TESTED, "transformers", ("5.17.0", installed))
    versions.warn_if_untested("crosslmm-x")
    assert versions.untested_release() is None and capsys.readouterr().err == ""

    monkeypatch.setitem(versions.TESTED, "transformers", ("4.0.0", "4.1.0"))
    versions.warn_if_untested("crosslmm-x")
    assert capsys.readouterr().err == (
        f"crosslmm-x: warning: transformers {installed} is outside the releases this version of crosslmm was tested "
        "on (4.0.0-4.1.x); if something fails, `pip install 'transformers>=4.0.0,<4.2'`\n"
    )
    monkeypatch.setenv("CROSSLMM_NO_VERSION_WARNING", "1")
    versions.warn_if_untested("crosslmm-x")
    assert capsys.readouterr().err == ""
