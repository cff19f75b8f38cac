"""Print the recipe reference (every section and key, its default and its docstring) as Markdown.

README.md embeds this output between the `recipe-reference` markers; a test keeps them equal:
    python scripts/recipe_reference.py --write   # refresh README.md
"""

import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from dpkit.recipe import Recipe

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def _section_model(annotation):
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in getattr(candidate, "__args__", ()):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory else field.default
    return f"`{value!r}`" if not isinstance(value, BaseModel) else ""


def reference() -> str:
    lines, top_level = [], []
    for name, field in Recipe.model_fields.items():
        model = _section_model(field.annotation)
        if model is None:
            doc = (field.description or "").replace("\n", " ").replace("|", "\\|")
            top_level.append(f"| `{name}` | {_default(field)} | {doc} |")
            continue
        lines += [f"**`{name}`**", "", "| key | default | meaning |", "|---|---|---|"]
        for key, sub in model.model_fields.items():
            doc = (sub.description or "").replace("\n", " ").replace("|", "\\|")
            nested = _section_model(sub.annotation)
            if nested is not None and key.endswith("sources"):
                doc += " Each source: " + ", ".join(f"`{k}`" for k in nested.model_fields) + "."
            lines.append(f"| `{name}.{key}` | {_default(sub)} | {doc} |")
        lines.append("")
    if top_level:
        lines += ["**top level**", "", "| key | default | meaning |", "|---|---|---|", *top_level]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    text = reference()
    if "--write" in sys.argv:
        readme = README.read_text()
        head, _, rest = readme.partition(BEGIN)
        _, _, tail = rest.partition(END)
        README.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
