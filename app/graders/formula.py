"""The `calculate_output` formula of a multi grader, e.g. `0.5 * exact + 0.5 * fuzzy`.

Parsed with `ast` and evaluated by walking the tree: never `eval`. Allowed: numbers, the
sub-graders' names, `+ - * /`, unary `-` and `+`, parentheses and `min`, `max`, `abs`.
Everything else (attributes, subscripts, other calls, `**`, comparisons, strings) is refused at
request time with a message naming it.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Mapping

# The functions a formula may call, with their least and most numbers of arguments.
FUNCTIONS: dict[str, tuple[int, int | None]] = {"min": (1, None), "max": (1, None), "abs": (1, 1)}
OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div)
ALLOWED = "numbers, the graders' names, + - * /, parentheses, min(), max() and abs()"


def _refuse(what: str) -> ValueError:
    return ValueError(f"calculate_output: {what} is not allowed; use {ALLOWED}")


def _check(node: ast.expr, names: frozenset[str]) -> None:
    match node:
        case ast.Constant(value=int() | float() as value) if not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ValueError(f"calculate_output: the number {ast.unparse(node)} is too large")
        case ast.Constant():
            raise _refuse(f"the constant {ast.unparse(node)}")
        case ast.Name(id=name):
            if name in FUNCTIONS:
                raise ValueError(f"calculate_output: {name} is a function; call it: {name}(...)")
            if name not in names:
                known = ", ".join(sorted(names))
                raise ValueError(
                    f"calculate_output: unknown name {name!r}; the graders are: {known}"
                )
        case ast.BinOp(left=left, op=op, right=right):
            if not isinstance(op, OPERATORS):
                raise _refuse(f"the operator in `{ast.unparse(node)}`")
            _check(left, names)
            _check(right, names)
        case ast.UnaryOp(op=op, operand=operand):
            if not isinstance(op, ast.USub | ast.UAdd):
                raise _refuse(f"the operator in `{ast.unparse(node)}`")
            _check(operand, names)
        case ast.Call(func=ast.Name(id=function), args=args, keywords=[]) if function in FUNCTIONS:
            least, most = FUNCTIONS[function]
            if len(args) < least or (most is not None and len(args) > most):
                raise ValueError(f"calculate_output: wrong number of arguments in {function}()")
            for argument in args:
                if isinstance(argument, ast.Starred):
                    raise _refuse(f"`*` unpacking in `{ast.unparse(node)}`")
                _check(argument, names)
        case ast.Call(func=function):
            raise _refuse(f"calling `{ast.unparse(function)}` (in `{ast.unparse(node)}`)")
        case ast.Attribute():
            raise _refuse(f"attribute access `{ast.unparse(node)}`")
        case _:
            raise _refuse(f"`{ast.unparse(node)}` ({type(node).__name__})")


@functools.lru_cache(maxsize=256)
def parse_formula(formula: str, names: frozenset[str]) -> ast.expr:
    """The checked expression tree of `formula`; a ValueError names what is wrong."""
    try:
        tree = ast.parse(formula.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"calculate_output is not a valid formula: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise ValueError("calculate_output is nested too deeply") from None
    try:
        _check(tree.body, names)
    except RecursionError:
        raise ValueError("calculate_output is nested too deeply") from None
    return tree.body


def evaluate(node: ast.expr, scores: Mapping[str, float]) -> float:
    """The formula's value; ZeroDivisionError when it divides by zero."""
    match node:
        case ast.Constant(value=int() | float() as value):
            return float(value)
        case ast.Name(id=name):
            return scores[name]
        case ast.BinOp(left=left, op=op, right=right):
            a, b = evaluate(left, scores), evaluate(right, scores)
            if isinstance(op, ast.Add):
                return a + b
            if isinstance(op, ast.Sub):
                return a - b
            if isinstance(op, ast.Mult):
                return a * b
            return a / b
        case ast.UnaryOp(op=op, operand=operand):
            value = evaluate(operand, scores)
            return -value if isinstance(op, ast.USub) else value
        case ast.Call(func=ast.Name(id=function), args=args):
            values = [evaluate(argument, scores) for argument in args]
            if function == "abs":
                return abs(values[0])
            return min(values) if function == "min" else max(values)
    raise AssertionError(f"unchecked formula node {type(node).__name__}")
