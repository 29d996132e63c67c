"""The package's public functions and methods carry type hints: counted with `ast`, so that
the share is checked, not claimed (mypy checks that the hints hold; `make lint` runs it)."""
import ast
import pathlib

import cllm_cli

PACKAGE = pathlib.Path(cllm_cli.__file__).parent
MIN_SHARE = 0.9


def public_functions(tree):
    """(name, is annotated) of every public function of a module and public method of its
    public classes (a public name has no leading underscore)."""
    def walk(body, in_class):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and not node.name.startswith("_"):
                yield node.name, annotated(node, in_class)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                yield from walk(node.body, True)
    return list(walk(tree.body, False))


def annotated(function, is_method):
    """Every parameter (self or cls of a method left out) and the return are annotated."""
    args = function.args
    params = args.posonlyargs + args.args
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod"
                 for d in function.decorator_list)
    if is_method and not static:
        params = params[1:]
    params = params + args.kwonlyargs + [p for p in (args.vararg, args.kwarg) if p is not None]
    return function.returns is not None and all(p.annotation is not None for p in params)


def test_most_public_functions_are_annotated():
    counted = [(path.relative_to(PACKAGE.parent), name, ok)
               for path in sorted(PACKAGE.rglob("*.py"))
               for name, ok in public_functions(ast.parse(path.read_text(encoding="utf-8")))]
    share = sum(ok for _, _, ok in counted) / len(counted)
    print(f"{sum(ok for _, _, ok in counted)} of {len(counted)} public functions and methods "
          f"annotated ({share:.1%})")
    missing = [f"{path}: {name}" for path, name, ok in counted if not ok]
    assert share >= MIN_SHARE, "not annotated:\n" + "\n".join(missing)


def test_the_count_tells_annotated_from_bare():
    """The premise: a bare function, a half-annotated one and a method without its return
    hint do not count; self, cls and a staticmethod's first parameter are treated right."""
    source = '''
def bare(a): pass
def typed(a: int, *rest: int, key: str = "", **more: str) -> None: pass
def half(a: int, b) -> None: pass
def _private(a): pass
class Public:
    def method(self, a: int) -> int: pass
    def no_return(self, a: int): pass
    @classmethod
    def make(cls, a: int) -> "Public": pass
    @staticmethod
    def helper(a) -> None: pass
class _Hidden:
    def method(self, a): pass
'''
    assert public_functions(ast.parse(source)) == [
        ("bare", False), ("typed", True), ("half", False), ("method", True),
        ("no_return", False), ("make", True), ("helper", False)]
