"""Chat templates rendered in a sandboxed Jinja environment, like transformers' (same filters
and globals, so templates from the Hub render the same), with an output size limit.

Run as a script (`python -I template_worker.py MEMORY_BYTES`), this module is the worker
process that renders untrusted templates (request-level and adapter templates): it reads one
JSON request per line on stdin ({"source", "context", "max_bytes"}) and writes one JSON
reply per line ({"text"} or {"error"}), under an address-space limit; the parent kills it
when a render runs past its time limit (chat_template.py). It imports nothing but jinja2.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


READY = '{"ready": true}'


class TemplateError(ValueError):
    """The template cannot be rendered (syntax, a raised exception, a limit); the message says why."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-token masks in training): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore-prefixed attributes (as transformers)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attributes may not start with '_' ({name!r})")


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (TemplateError for a syntax error)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise TemplateError(f"the chat template does not compile: {error.message} (line {error.lineno})") from None


def render_template(source: str, context: dict, max_bytes: int) -> str:
    """The rendered text; TemplateError when it fails or grows past max_bytes characters."""
    template = compile_template(source)
    parts, size = [], 0
    try:
        for part in template.generate(**context):
            size += len(part)
            if size > max_bytes:
                raise TemplateError(f"the chat template's output is over the limit of {max_bytes} characters")
            parts.append(part)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as error:
        raise TemplateError(f"the chat template tried something the sandbox forbids: {error}") from None
    except jinja2.exceptions.TemplateError as error:
        raise TemplateError(f"the chat template raised an error: {error}") from None
    except (RecursionError, MemoryError) as error:
        raise TemplateError(f"the chat template used too much memory or recursion ({type(error).__name__})") from None
    except Exception as error:  # noqa: BLE001 - any other failure inside the template's own code
        raise TemplateError(f"the chat template failed: {type(error).__name__}: {error}") from None
    return "".join(parts)


def _serve(memory_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    sys.stdout.write(READY + "\n")            # imports done: renders are timed from here
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            reply = {"text": render_template(request["source"], request["context"], request["max_bytes"])}
        except TemplateError as error:
            reply = {"error": str(error)}
        except MemoryError:
            reply = {"error": "the chat template used more memory than allowed"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
