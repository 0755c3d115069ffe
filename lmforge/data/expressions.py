"""Safe conditions over a record's metadata columns, e.g. `votes >= 3 and is_best == 1`.

Owns parsing (with `ast`), the whitelist of allowed syntax, and errors that point at the offending column of the
expression. Allowed: comparisons (== != < <= > >= in, not in, is None / is not None), and/or/not, column names,
constants (numbers, strings, True/False/None, also true/false/null) and literal lists/tuples/sets of constants.
Not allowed: calls, attribute access, subscripts, arithmetic, comprehensions, lambdas. Used by `data clean`
(the `where` filter) and `data convert --where`. Must not know about files or messages.
"""

from __future__ import annotations

import ast
import operator
import re

from ..errors import DataError, UserError

_COMPARE_OPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Is, ast.IsNot)
# YAML/JSON spellings, so `is_best == true` works as written in a recipe.
_LITERAL_NAMES = {"true": True, "false": False, "null": None}
_NODE_NAMES = {ast.Call: "function calls", ast.Attribute: "attribute access (a.b)", ast.Subscript: "subscripts (a[b])",
               ast.BinOp: "arithmetic", ast.Lambda: "lambdas", ast.IfExp: "if/else expressions",
               ast.Dict: "dict literals", ast.NamedExpr: "assignments (:=)", ast.Starred: "starred expressions",
               ast.JoinedStr: "f-strings", ast.ListComp: "comprehensions", ast.SetComp: "comprehensions",
               ast.GeneratorExp: "comprehensions", ast.DictComp: "comprehensions", ast.Await: "await"}
_ALLOWED_HELP = ("allowed: column names, numbers, 'strings', True/False/None, comparisons (== != < <= > >= in, "
                 "not in, is None), and/or/not, literal lists like [1, 2]")


class Condition:
    """A compiled condition: `condition(record) -> bool`. `text` is the source, `columns` the names it reads."""

    def __init__(self, text: str, code, columns: tuple[str, ...]) -> None:
        self.text = text
        self.columns = columns
        self._code = code

    def __call__(self, record: dict) -> bool:
        texts = {c: TextCell(record[c]) for c in self.columns if isinstance(record.get(c), str)}
        if texts:
            record = {**record, **texts}
        try:
            # Safe: the tree was checked to hold only names, constants, comparisons and boolean operators, and
            # builtins are empty, so a name can only ever be looked up in the record.
            return bool(eval(self._code, {"__builtins__": {}}, record))  # builtins emptied above
        except NameError:
            missing = [c for c in self.columns if c not in record and c not in _LITERAL_NAMES]
            raise DataError(f"where {self.text!r}: no column {' or '.join(map(repr, missing))} in the record; "
                            f"its columns are: {', '.join(map(str, record)) or 'none'}") from None
        except TypeError as err:
            values = ", ".join(f"{c}={record.get(c)!r}" for c in self.columns if c in record)
            raise DataError(f"where {self.text!r}: cannot evaluate on a record with {values} ({err}); guard it, "
                            f"e.g. `votes is not None and votes >= 3`, or fix the column's type") from None

    def describe(self, record: dict) -> str:
        """The columns this condition reads with their values in `record`, for rejection reasons."""
        return ", ".join(f"{c}={record.get(c)!r}" for c in self.columns)

    def __repr__(self) -> str:
        return f"Condition({self.text!r})"


def compile_condition(text: str) -> Condition:
    """Parse and check `text`; raise UserError naming the position of the first disallowed or invalid part."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"where: expected a condition such as \"votes >= 3 and is_best == 1\", got {text!r}")
    source = text.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as err:
        at_end = not err.offset or err.offset > len(source)
        column = len(source) + 1 if at_end else err.offset
        reason = "incomplete expression" if at_end else err.msg
        hint = "\nuse == to compare, not =" if re.search(r"(?<![=!<>])=(?!=)", source) else ""
        raise UserError(f"where: invalid expression at column {column}: {reason}\n{_pointer(source, column)}"
                        f"{hint}") from None
    columns: list[str] = []
    for node in ast.walk(tree):
        problem = _check(node, columns)
        if problem:
            column = _column(node)
            raise UserError(f"where: {problem} not allowed (column {column})\n{_pointer(source, column)}\n"
                            f"{_ALLOWED_HELP}")
    tree = _LiteralNames().visit(tree)
    code = compile(ast.fix_missing_locations(tree), "<where>", "eval")
    return Condition(source, code, tuple(dict.fromkeys(columns)))


def _check(node: ast.AST, columns: list[str]) -> str | None:
    """Why `node` is not allowed, or None. Collects column names on the way."""
    if isinstance(node, ast.Expression | ast.Load | ast.And | ast.Or | ast.Not | ast.USub | ast.UAdd | ast.BoolOp):
        return None
    if isinstance(node, _COMPARE_OPS):
        return None
    if isinstance(node, ast.Name):
        if node.id.startswith("__"):
            return f"the name {node.id!r}"
        if node.id not in _LITERAL_NAMES:
            columns.append(node.id)
        return None
    if isinstance(node, ast.Constant):
        return None if isinstance(node.value, str | int | float | bool | type(None)) else "this constant"
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not) or isinstance(node.operand, ast.Constant):
            return None
        return "unary operators on columns"
    if isinstance(node, ast.Compare):
        for op, right in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.Is | ast.IsNot) and not (isinstance(right, ast.Constant) and right.value is None):
                return "`is` with anything but None (use ==)"
        return None
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        if all(_is_literal(element) for element in node.elts):
            return None
        return "lists of anything but constants"
    return _NODE_NAMES.get(type(node), f"{type(node).__name__} expressions")


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        return isinstance(node.operand, ast.Constant)
    return isinstance(node, ast.Name) and node.id in _LITERAL_NAMES


class _LiteralNames(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _LITERAL_NAMES:
            return ast.copy_location(ast.Constant(_LITERAL_NAMES[node.id]), node)
        return node


def _column(node: ast.AST) -> int:
    """1-based column to point at: the dot of an attribute access, else the start of the node."""
    if isinstance(node, ast.Attribute) and node.end_col_offset is not None:
        return node.end_col_offset - len(node.attr)
    return getattr(node, "col_offset", 0) + 1


def _pointer(source: str, column: int) -> str:
    return f"  {source}\n  {' ' * (column - 1)}^"


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class TextCell(str):
    """A text value as a condition sees it (CSV cells are all text; scraped JSON often has "12" for 12): compared
    with a number, it compares by its numeric value when it looks like one, so `is_best == 1` matches "1" and
    `votes >= 10` orders "9" below 10; compared with text, it is text, so `is_best == "1"` matches too. Only the
    condition sees values this way; records are not changed. Hashing stays the text's: `x in [1, 2]` works, a set
    `{1, 2}` does not."""

    __hash__ = str.__hash__

    def _compare(self, other: object, op) -> bool:
        if isinstance(other, int | float):
            number = as_number(str(self))
            if isinstance(number, str):
                if op in (operator.eq, operator.ne):
                    return op is operator.ne
                raise TypeError(f"cannot compare the text {str(self)!r} with the number {other!r}")
            return op(number, other)
        return op(str(self), other)

    def __eq__(self, other):
        return self._compare(other, operator.eq)

    def __ne__(self, other):
        return self._compare(other, operator.ne)

    def __lt__(self, other):
        return self._compare(other, operator.lt)

    def __le__(self, other):
        return self._compare(other, operator.le)

    def __gt__(self, other):
        return self._compare(other, operator.gt)

    def __ge__(self, other):
        return self._compare(other, operator.ge)


def as_number(text: str) -> object:
    stripped = text.strip()
    if not _NUMBER.fullmatch(stripped):
        return text
    number = float(stripped)
    return int(stripped) if stripped.lstrip("+-").isdigit() else number
