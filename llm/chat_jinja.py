"""A model's Jinja chat template read as data (`ChatTemplate`), by rendering it on marker messages.

    template = derive(tokenizer_config["chat_template"], special_tokens, bos_token="<s>", eos_token="</s>")

The template is rendered as `transformers` renders it (`render_jinja_template` in
transformers/utils/chat_template_utils.py: jinja2's `ImmutableSandboxedEnvironment`
with trim_blocks and lstrip_blocks, the loopcontrols extension, `raise_exception`,
`strftime_now` and a `tojson` that does not escape HTML) on conversations whose
contents are unique markers. The text between markers is the format: the
begin, each role's header and footer, the default system message and what ends
a conversation. The derived format is then rendered again, by our own rule, on
every marker conversation and must give Jinja's text exactly; where it does not
(a template that folds the system prompt into a user turn, as Llama 2's and
Mistral's do, or one that rejects a system message, as Gemma's does) the format
has no system turn, and where even the user and assistant turns do not fit, a
`ChatTemplateError` names the template and what did not fit.

Departures from transformers: only `bos_token` and `eos_token` are passed (not
every special token of the tokenizer), and content is never trimmed or
otherwise changed by the template (a template that trims, like Llama 3's, renders
content with surrounding whitespace differently from ours).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from llm.chat_format import ChatTemplate, ChatTemplateError

_ROLES = {"s": "system", "u": "user", "a": "assistant"}
# Known shapes keep their names (the tokenizer tests and saved files rely on them).
_NAMED = {("<|im_start|>{role}\n", "<|im_end|>\n"): "chatml",
          ("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"): "llama3"}


def environment():
    """jinja2's sandbox set up as transformers sets it up for chat templates."""
    try:
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:  # pragma: no cover - jinja2 ships with the install
        raise ChatTemplateError("reading a model's chat template needs jinja2 (pip install 'jinja2>=3.1.6')") from e

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_text(template: ChatTemplate, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """Our rule as text (`chat_format._render` with text content): what the derived format must reproduce."""
    out = [template.begin]
    if template.default_system is not None and (not messages or messages[0]["role"] != "system"):
        out += [template.role_header("system"), template.default_system, template.role_footer("system")]
    for m in messages:
        out += [template.role_header(m["role"]), m["content"], template.role_footer(m["role"])]
    out.append(template.role_header("assistant") if add_generation_prompt else template.end)
    return "".join(out)


def derive(source: str, special_tokens: Iterable[str], *, bos_token: str | None = None,
           eos_token: str | None = None, name: str | None = None) -> ChatTemplate:
    """The `ChatTemplate` that renders as the Jinja `source` does, or a ChatTemplateError naming what does not fit."""
    label = repr(name) if name else "(unnamed)"
    special = sorted(set(special_tokens), key=len, reverse=True)
    splitter = re.compile("(" + "|".join(map(re.escape, special)) + ")") if special else None
    try:
        compiled = environment().from_string(source)
    except Exception as e:  # noqa: BLE001 - any syntax error, or a tag transformers adds (`generation`)
        raise ChatTemplateError(f"chat template {label}: jinja2 cannot parse it ({e})") from None
    marks = [f"\u27e6m{i}\u27e7" for i in range(6)]  # ⟦m0⟧: text no template spells

    def conversation(roles: str) -> list[dict[str, str]]:  # "sua": system, user, assistant; message i says marks[i]
        return [{"role": _ROLES[r], "content": marks[i]} for i, r in enumerate(roles)]

    @functools.cache
    def render(roles: str, gen: bool) -> str:
        context = {"messages": conversation(roles), "add_generation_prompt": gen, "tools": None, "documents": None}
        context.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None})
        try:
            return compiled.render(**context)
        except Exception as e:  # noqa: BLE001 - the template's own raise_exception, undefined names, sandbox refusals
            raise ChatTemplateError(f"chat template {label}: rendering {roles!r} fails ({type(e).__name__}: {e})") from None

    def pieces(roles: str, gen: bool) -> list[str]:
        """The template's text around each marker: len(roles) + 1 pieces, or an error."""
        text = render(roles, gen)
        out = []
        for i in range(len(roles)):
            before, sep, text = text.partition(marks[i])
            if not sep or any(m in before for m in marks):
                raise ChatTemplateError(f"chat template {label}: message {i} of {roles!r} does not appear once, in "
                                        "order and unchanged (not a role-wrapped template)")
            out.append(before)
        return [*out, text]

    def common_prefix(a: str, b: str) -> str:
        """The longest common prefix that does not cut a special token."""
        n = 0
        for x, y in zip(_split(splitter, a), _split(splitter, b)):
            if x == y:
                n += len(x)
                continue
            if not (x in special or y in special):
                n += len(_os_prefix(x, y))
            break
        return a[:n]

    checks = ["uaua", "u", "ua", "uau", "uauau"]

    def expected(template: ChatTemplate, roles: str, gen: bool) -> str:
        # A template that ignores add_generation_prompt still gets the assistant's header (as llama.cpp opens the turn).
        done = render(roles, False)
        if not gen or render(roles, True) != done or not done.endswith(template.end):
            return render(roles, gen)
        return done[:len(done) - len(template.end)] + template.role_header("assistant")

    def fits(template: ChatTemplate | None) -> bool:
        if template is None:
            return False
        roles_checked = checks + (["suaua", "su", "sua"] if "system" in template.headers else [])
        return all(render_text(template, conversation(roles), gen) == expected(template, roles, gen)
                   for roles in roles_checked for gen in (False, True))

    p = pieces("uaua", False)
    if p[1] != p[3] or p[2] != pieces("uauau", False)[4]:
        raise ChatTemplateError(f"chat template {label}: its turns differ from one exchange to the next")
    # p[1] is a user footer and an assistant header, p[2] an assistant footer and a user header, p[4] an assistant
    # footer and the end. Where to cut: first where the longest common prefixes say (the text a user turn and an
    # assistant turn both end with), then between any two special tokens (Llama 3's first template, which always
    # ends in the assistant's header).
    first = (len(common_prefix(p[1], pieces("u", False)[1])), len(common_prefix(p[2], p[4])))
    problem = None
    for user_cut, assistant_cut in dict.fromkeys([first, *itertools.product(_cuts(splitter, p[1]), _cuts(splitter, p[2]))]):
        user_footer, assistant_header = p[1][:user_cut], p[1][user_cut:]
        assistant_footer, user_header = p[2][:assistant_cut], p[2][assistant_cut:]
        if not (p[4].startswith(assistant_footer) and p[0].endswith(user_header)):
            continue
        end, opening = p[4][len(assistant_footer):], p[0][:len(p[0]) - len(user_header)]
        if _split(splitter, assistant_footer)[:1] not in ([s] for s in special):
            problem = problem or (f"an assistant turn ends in {assistant_footer!r}, which does not begin with a "
                                  "special token (no end-of-turn token to stop at)")
            continue
        turns = {"headers": {"user": user_header, "assistant": assistant_header},
                 "footers": {"user": user_footer, "assistant": assistant_footer}}
        for template in (_with_system(pieces, opening, user_header, turns, splitter, end),
                         ChatTemplate(name or "jinja", user_header, assistant_footer, begin=opening, end=end, **turns)):
            if fits(template):
                return _named(template, name)
        problem = problem or f"its generation prompt or turns do not fit a header and footer per role (tried {template})"
    raise ChatTemplateError(f"chat template {label}: {problem or 'its first user turn opens unlike the others'}")


def _with_system(pieces, opening: str, user_header: str, turns: dict, splitter, end: str) -> ChatTemplate | None:
    """The format with a system turn, or None where the template has none we can render (it rejects or folds it)."""
    try:
        q = pieces("suaua", False)
    except ChatTemplateError:
        return None
    if not q[1].endswith(user_header):
        return None
    system_footer = q[1][:len(q[1]) - len(user_header)]
    # q[0] is begin + the system header; `opening` (no system given) is begin, or begin + the default system turn.
    for cut in _cuts(splitter, q[0]):
        begin, system_header = q[0][:cut], q[0][cut:]
        default = None
        if opening != begin:
            head = begin + system_header
            if not (len(head) + len(system_footer) <= len(opening) and opening.startswith(head)
                    and opening.endswith(system_footer)):
                continue
            default = opening[len(head):len(opening) - len(system_footer)]
        headers = {"system": system_header, **turns["headers"]}
        footers = {"system": system_footer, **turns["footers"]}
        return ChatTemplate("jinja", user_header, turns["footers"]["assistant"], begin=begin, default_system=default,
                            headers=headers, footers=footers, end=end)
    return None


def _named(template: ChatTemplate, name: str | None) -> ChatTemplate:
    """One `{role}` header when every role fits it (ChatML, Llama 3: as they were before templates were derived)."""
    headers, footers = template.headers or {}, template.footers or {}
    pattern = headers.get("user", "").replace("user", "{role}", 1)
    uniform = ("system" in headers and all(h == pattern.replace("{role}", r) for r, h in headers.items())
               and len(set(footers.values())) == 1)
    fields = dict(template.__dict__)
    if uniform:
        fields.update(header=pattern, headers=None, footers=None)
    else:
        fields["footers"] = {r: f for r, f in footers.items() if f != template.footer} or None
    fields["name"] = _NAMED.get((fields["header"], template.footer), name or "jinja") if uniform else (name or "jinja")
    return ChatTemplate(**fields)


def _cuts(splitter: re.Pattern | None, text: str) -> list[int]:
    """Offsets in `text` between its special tokens and the text around them."""
    cuts = [0]
    for piece in _split(splitter, text):
        cuts.append(cuts[-1] + len(piece))
    return cuts


def _split(splitter: re.Pattern | None, text: str) -> list[str]:
    return [p for p in splitter.split(text) if p] if splitter else ([text] if text else [])


def _os_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
