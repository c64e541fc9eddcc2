"""Keys a JSON config file gives more than once, and the lines they are on.

json.loads keeps the last of a repeated key without a word, and its object_pairs_hook sees an object's
pairs but not where they were in the file.  ``decode`` here notes the repeated keys of each object (the
``duplicates`` of a DuplicatesObject), and only when there are some, ``key_lines`` walks the text once
more for their lines, so that ``config.parse`` can say ``endpoints[1] (aliases).bind-port: given more than
once (lines 12 and 14)``.  The text has decoded already, so the walk needs to know only strings and
brackets.
"""

import json
from typing import Dict, List, Tuple

WHITESPACE = " \t\r\n"


class DuplicatesObject(dict):
    """A decoded JSON object; ``duplicates``: {key given more than once: [the lines it is on]}."""
    duplicates: Dict[str, List[int]] = {}


def decode(text: bytes):
    """json.loads with every object a DuplicatesObject; ValueError (UnicodeDecodeError) as json.loads."""
    found = []

    def pairs_hook(pairs):
        obj = DuplicatesObject()
        for key, value in pairs:
            if key in obj:
                found.append(obj)
            obj[key] = value
        return obj
    raw = json.loads(text, object_pairs_hook=pairs_hook)
    if found:
        for (path, key), lines in key_lines(text.decode("utf-8")).items():
            if len(lines) > 1:
                obj = raw
                for step in path:
                    obj = obj[step]
                obj.duplicates = {**obj.duplicates, key: lines}
    return raw


def key_lines(text: str) -> Dict[Tuple[tuple, str], List[int]]:
    """{(path of the object, key): [line of each time it is given]} of valid JSON ``text``; a path is the
    keys and list indices from the top (``("endpoints", 1)``)."""
    found, stack, line, i = {}, [], 1, 0   # stack: [bracket, its current key or index] of each open one
    while i < len(text):
        c = text[i]
        if c == "\n":
            line += 1
        elif c == '"':
            end = i + 1
            while text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            after = end + 1
            while text[after] in WHITESPACE:
                after += 1
            if stack and stack[-1][0] == "{" and text[after] == ":":   # a key, not a value
                key = json.loads(text[i:end + 1])
                stack[-1][1] = key
                found.setdefault((tuple(entry[1] for entry in stack[:-1]), key), []).append(line)
            i = end   # a JSON string holds no raw newline
        elif c in "{[":
            stack.append([c, 0 if c == "[" else None])
        elif c in "}]":
            stack.pop()
        elif c == "," and stack[-1][0] == "[":
            stack[-1][1] += 1
        i += 1
    return found
