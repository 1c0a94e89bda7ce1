"""Downstream tasks for the accuracy benchmark, derived offline from the Python standard library.

Items come from the same files as the demo's corpus (``demo_model.corpus_files``), parsed with
``ast``. Training items come from the ``train`` and ``finetune`` files, test items from the
``eval`` files only, so no test item shares a source file with a training item (and the eval
files were never seen in pretraining). The hyper-parameter pilot trains on the ``train`` files'
items and scores on the ``finetune`` files' items. Every answer is a deterministic function of the prompt
or of the source; scoring is exact match of a greedy decode.

An item is ``(prompt, answer)``; the model is trained on ``prompt + answer + "\\n"`` with the loss on
the answer and the newline only, and a decode is cut at its first newline.
"""
from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable

import demo_model as dm  # examples/ is on sys.path (bench_accuracy.py puts it there)


def _functions(split: str, include_tests: bool = False):
    """(name, node) of every function and method in the split's files, in file order."""
    for path in dm.corpus_files(split, include_tests):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield node


def docstring_to_name(split: str, include_tests: bool = False) -> list[tuple[str, str]]:
    """A function's one-line docstring summary -> its name (written as a comment, then ``def ``)."""
    out = []
    for node in _functions(split, include_tests):
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("__"):
            continue
        first = doc.strip().split("\n")[0].strip()
        if 8 <= len(first) <= 100:
            out.append((f"# {first}\ndef ", node.name))
    return out


def snake_to_camel_name(name: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in name.split("_"))


_SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z][a-z0-9]*)+")


def snake_to_camel(split: str, include_tests: bool = False) -> list[tuple[str, str]]:
    """A snake_case function name -> CamelCase (``get_source_segment`` -> ``GetSourceSegment``)."""
    names = sorted({n.name for n in _functions(split, include_tests) if _SNAKE.fullmatch(n.name)})
    return [(f"{n} -> ", snake_to_camel_name(n)) for n in names]


def count_params(split: str, include_tests: bool = False) -> list[tuple[str, str]]:
    """A real ``def`` line (defaults and annotations as written, via ``ast.unparse``) -> how many
    parameters it declares (0-9): ``*args``/``**kw`` count, the bare ``*`` and ``/`` markers do not."""
    out = []
    for node in _functions(split, include_tests):
        a = node.args
        n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
        line = f"def {node.name}({ast.unparse(a)}):"
        if n <= 9 and len(line) <= 100:
            out.append((f"{line}  # number of parameters:", str(n)))
    return out


TASKS: dict[str, Callable[..., list[tuple[str, str]]]] = {
    "docstring_to_name": docstring_to_name,
    "snake_to_camel": snake_to_camel,
    "count_params": count_params,
}


def load_task(name: str, include_tests: bool = False, max_test: int | None = None, seed: int = 0,
              validation: bool = False):
    """(train_items, test_items): train from the train+finetune files, test from the eval files.

    ``validation=True`` (the hyper-parameter pilot): train from the train files, score on the
    finetune files; the eval files are not touched. Duplicate items are dropped, and any training
    item whose prompt also appears among the scored items is removed (the same ``def`` line in two
    files, say). ``max_test`` keeps a fixed random subset of the scored items.
    """
    make = TASKS[name]
    if validation:
        test, train = list(dict.fromkeys(make("finetune"))), make("train", include_tests)
    else:
        test, train = list(dict.fromkeys(make("eval"))), make("train", include_tests) + make("finetune")
    test_prompts = {p for p, _ in test}
    train = [it for it in dict.fromkeys(train) if it[0] not in test_prompts]
    rng = random.Random(seed)
    rng.shuffle(train)
    if max_test is not None and len(test) > max_test:
        test = sorted(rng.sample(test, max_test))
    return train, test


# How a chat model is asked each task (the real model's preset): the item's prompt is the part before the marker.
CHAT_QUESTIONS = {
    "count_params": ("How many parameters does this Python function declare? Answer with the number only.\n\n{}",
                     "  # number of parameters:"),
    "snake_to_camel": ("Write this snake_case name in CamelCase, and nothing else: {}", " -> "),
    "docstring_to_name": ("Which Python function name fits this docstring? Answer with the name only.\n\n{}",
                          "\ndef "),
}


def as_chat(tokenizer, name: str, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The items as a user turn of `tokenizer`'s chat template, the assistant's turn opened for the answer."""
    question, marker = CHAT_QUESTIONS[name]
    out = []
    for prompt, answer in items:
        text = question.format(prompt.split(marker)[0].removeprefix("# "))
        out.append((tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True), answer))
    return out
