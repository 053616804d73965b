"""Command-line runs for the tests, forked from a process that has imported the libraries.

`python -m tool args` spends 2-4 s of CPU importing jax, flax, orbax, grain and our library
before the tool does anything, and the suite runs about 140 such commands. This server imports
them once; each request forks a child that runs the tool exactly as `python -m` would (as
`__main__`, with its own argv, environment, working directory, stdout, stderr, exit status and
interpreter shutdown). JAX's backend is never started in the server, so each child starts its
own, with the XLA_FLAGS of its request. Requests whose JAX_* settings differ from the server's
(read when jax is imported) are not sent here: tests/test_cli.run starts a fresh process.

Protocol, one JSON line each way: a request {module, args, env, cwd, stdout, stderr} (file
paths); the answer {pid} at once, then {returncode} when the child has ended.
"""
import json
import os
import runpy
import sys

PRELOAD = ("jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "grain", "numpy",
           "sentencepiece", "tokenizers", "safetensors", "matplotlib", "ml_collections",
           "train.loop", "train.runs", "train.hf_runs", "train.pretrained", "train.tasks",
           "train.cli", "data.tokenizer", "models.gpt", "models.bert", "models.transformer")


def _child(request):
    """Becomes the requested `python -m` run; never returns to the server loop."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(os.devnull, encoding="utf-8")  # not the server's buffered requests
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)  # the interpreter's own shutdown: atexit hooks, thread joins, exit status


def serve():
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    for module in PRELOAD:
        __import__(module)
    answers.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            _child(request)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
