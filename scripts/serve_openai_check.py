"""The `openai` Python client against a running `prolora serve`: models list, completions,
chat, streaming, stop, seed, and errors raised as the client's exception types.

    prolora serve --model tiny --adapter a=DIR_A --adapter b=DIR_B --api-key sk-x --port 8000
    python scripts/serve_openai_check.py --base-url http://127.0.0.1:8000/v1 --api-key sk-x \
        --base tiny --adapters a b

Needs `pip install openai`. Prints one line per check and exits non-zero on the first failure.
"""

import argparse
import sys

import openai


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--base", required=True, help="the base model's name")
    ap.add_argument("--adapters", nargs="+", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)

    ids = [m.id for m in client.models.list()]
    check("models lists the base and every adapter",
          all(n in ids for n in [args.base, *args.adapters]), str(ids))

    answers = {}
    for name in [args.base, *args.adapters]:
        r = client.completions.create(model=name, prompt="Once upon a time", max_tokens=8,
                                      temperature=0)
        answers[name] = r.choices[0].text
        check(f"completion on {name}", r.usage.completion_tokens == 8
              and r.choices[0].finish_reason == "length", repr(r.choices[0].text))
    check("the adapters answer differently", len(set(answers.values())) > 1)

    adapter = args.adapters[0]
    chat = client.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": "Hello!"}], max_tokens=10,
        temperature=0)
    text = chat.choices[0].message.content
    check("chat completion", chat.choices[0].message.role == "assistant"
          and chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens,
          repr(text))

    stream = client.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": "Hello!"}], max_tokens=10,
        temperature=0, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check("a stream adds up to the answer", streamed == text,
          f"{len(chunks)} chunks, {streamed!r}")
    check("the last chunk has finish_reason", chunks[-1].choices[0].finish_reason == "length")

    words = text.split()
    if len(words) > 2:
        stop = words[2]
        r = client.chat.completions.create(
            model=adapter, messages=[{"role": "user", "content": "Hello!"}], max_tokens=10,
            temperature=0, stop=[stop])
        check("stop cuts before the stop sequence",
              r.choices[0].message.content == text[:text.find(stop)]
              and r.choices[0].finish_reason == "stop", repr(r.choices[0].message.content))

    def sample(seed):
        r = client.completions.create(model=adapter, prompt="The sea", max_tokens=12,
                                      temperature=1.0, seed=seed)
        return r.choices[0].text
    check("a seed repeats its sample", sample(7) == sample(7))
    check("another seed samples differently", sample(7) != sample(8))

    def raises(name, kind, call):
        try:
            call()
        except kind as e:
            check(name, True, f"{type(e).__name__} {e.status_code}")
            return
        except Exception as e:  # noqa: BLE001 (the wrong type is the failure reported)
            check(name, False, f"{type(e).__name__}: {e}")
        check(name, False, "no error")

    raises("unknown model: NotFoundError", openai.NotFoundError,
           lambda: client.completions.create(model="no-such-adapter", prompt="x"))
    raises("n = 2: BadRequestError", openai.BadRequestError,
           lambda: client.completions.create(model=adapter, prompt="x", n=2))
    raises("too long: BadRequestError", openai.BadRequestError,
           lambda: client.completions.create(model=adapter, prompt="word " * 5000))
    raises("wrong key: AuthenticationError", openai.AuthenticationError,
           lambda: openai.OpenAI(base_url=args.base_url, api_key="wrong", max_retries=0)
           .models.list())
    print("all checks passed")


if __name__ == "__main__":
    main()
