"""The chat-template environment built as transformers builds it (`_compile_jinja_template` in
transformers/utils/chat_template_utils.py), so a template renders here as `apply_chat_template` renders it: a
sandbox with trim_blocks and lstrip_blocks, the `loopcontrols` extension (`{% break %}`, `{% continue %}`),
`{% generation %}` blocks rendered as their body, a `tojson` that does not escape HTML (ensure_ascii False;
indent, separators and sort_keys as json.dumps), and the globals `raise_exception` and `strftime_now`.
Not copied: transformers' hardened `dict` and `namespace` globals (jinja's own are used)."""

import json
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers tracks the assistant text inside; we render it."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env
