"""lm-eval adapter for a live harness `LanguageModel` and its tokenizer (registered as "regla").

The adapter holds references, never copies: scoring a model mid-training sees its current weights.
Loglikelihoods are computed in batches with right padding -- the model is causal and has no
attention mask, and padding *after* a sequence cannot change the logits at earlier positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .data.tokenization import Tokenizer
from .model import LanguageModel
from .postlin.start import load_trained
from .progress import bar as progress_bar


@register_model("regla")
class ReGLALM(TemplateLM):
    """`model` and `tokenizer` are live objects; `pretrained=<checkpoint dir>` loads both instead (CLI-style)."""

    def __init__(
        self,
        model: LanguageModel | None = None,
        tokenizer: Tokenizer | None = None,
        batch_size: int | str = 8,
        max_gen_toks: int | str = 256,
        checkpoint: str | Path | None = None,
        pretrained: str | Path | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        checkpoint = checkpoint or pretrained  # `pretrained=` is what lm-eval's CLI users write
        if model is None:
            if checkpoint is None:
                raise ValueError("ReGLALM needs a model and tokenizer, or pretrained=<checkpoint directory>")
            model, saved_tokenizer = load_trained(checkpoint, map_location=kwargs.get("device") or "cpu")
            tokenizer = tokenizer or saved_tokenizer
        if tokenizer is None:
            raise ValueError("ReGLALM needs the tokenizer the model was trained with")
        # lm-eval passes batch_size="auto" or None through its own CLI plumbing.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.model = model
        self.text_tokenizer = tokenizer
        #: every layer's output at t depends on inputs <= t only (then right padding is harmless)
        self.causal = all(layer.feature_map.causal for layer in model.linear_attention_layers())

    @classmethod
    def from_checkpoint(cls, directory: str | Path, **kwargs: Any) -> ReGLALM:
        return cls(checkpoint=directory, **kwargs)

    # -- what lm-eval asks about the model ---------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eot_id

    @property
    def tokenizer_name(self) -> str:
        return self.text_tokenizer.name

    def get_model_info(self) -> dict[str, Any]:
        """Merged by lm-eval into results["config"]: the context length every score depends on."""
        return {
            "max_length": self.max_length,
            "tokenizer": self.tokenizer_name,
            "parameters": self.model.num_parameters(),
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.text_tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.text_tokenizer.decode(tokens)

    # -- scoring -----------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding yields the continuation.

        Contexts are cut from the left so that context + continuation[:-1] fits the model's window.
        """
        for _, _context, continuation in requests:
            if not continuation:
                raise ValueError("a loglikelihood request needs a non-empty continuation")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"continuation of {len(continuation)} tokens exceeds the model's max_seq_len {self.max_length}"
                )
        # Longest first: the batch with the longest rows runs first (memory errors surface early)
        # and rows of similar length share a batch, so little compute goes to padding. Requests
        # with the same context + continuation[:-1] (the choices of a multiple-choice question
        # that are one token long) share one row: the same logits score all of them.
        collator = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts",
            group_fn=lambda r: r[1] + r[2][:-1],
        )
        results = []
        was_training = self.model.training
        self.model.eval()
        progress = progress_bar(total=len(requests), enabled=not disable_tqdm, desc="loglikelihood")
        with torch.no_grad():
            for batch in collator.get_batched(n=self.batch_size):
                for row, (batch_request, context, batch_continuation) in zip(self._logits_batch(batch), batch):
                    for request, continuation, logits in collator.get_cache(
                        req_str=batch_request, cxt_toks=context, cont_toks=batch_continuation, logits=row
                    ):
                        results.append(self._score(request, continuation, logits[0]))
                        progress.update(1)
        progress.close()
        self.model.train(was_training)
        return collator.get_original(results)

    def _logits_batch(self, batch: list[tuple[Any, list[int], list[int]]]) -> list[torch.Tensor]:
        """Per request, the logits [1, n_cont, vocab] at the positions that predict its continuation."""
        inputs = []
        for _, context, continuation in batch:
            whole = (context + continuation)[-(self.max_length + 1) :]
            inputs.append(whole[:-1])
        # Right padding cannot change a causal model's logits at earlier positions. A model that
        # reads ahead (safe_exp's `sequence` or `chunk` key max) would see the pads, so its rows
        # run in groups of equal length, without padding: scores never depend on batch-mates.
        groups = [list(range(len(inputs)))]
        if not self.causal:
            by_length: dict[int, list[int]] = {}
            for row, ids in enumerate(inputs):
                by_length.setdefault(len(ids), []).append(row)
            groups = list(by_length.values())
        out: list[torch.Tensor | None] = [None] * len(inputs)
        for rows in groups:
            width = max(len(inputs[row]) for row in rows)
            padded = torch.zeros(len(rows), width, dtype=torch.long)
            for i, row in enumerate(rows):
                padded[i, : len(inputs[row])] = torch.tensor(inputs[row], dtype=torch.long)
            logits, _ = self.model(padded.to(self.device))  # [b, T, vocab]
            # The logits at position t predict token t + 1: the continuation's predictors are the
            # last len(continuation) positions of the row's (unpadded) input.
            for i, row in enumerate(rows):
                n, continuation = len(inputs[row]), batch[row][2]
                out[row] = logits[i, n - len(continuation) : n][None]
        return out

    def _score(self, request: Any, continuation: list[int], logits: torch.Tensor) -> tuple[float, bool]:
        # A request sharing another's row may have a shorter continuation: its predictors are last.
        logprobs = F.log_softmax(logits[-len(continuation) :].float(), dim=-1)  # [n_cont, vocab]
        target = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
        answer = (float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all()))
        if request is not None:
            self.cache_hook.add_partial("loglikelihood", request, answer)
        return answer

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's disjoint rolling windows of max_length.

        Every token is predicted exactly once; the first from the end-of-text prefix token, later
        windows with as much preceding context as fits the model's window.
        """
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, target in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, target))
                owner.append(index)
        # One pass over all windows of all documents, so short documents share batches.
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation --------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation per request, stopped by the task's stop strings or max_gen_toks.

        Requests run one at a time: without an attention mask, a batch would need equal-length
        (left-aligned) prompts, and the recurrent state makes per-request decoding cheap anyway.
        """
        outputs = []
        for request in progress_bar(requests, enabled=not disable_tqdm, desc="generate_until"):
            context, gen_kwargs = request.args
            options = normalize_gen_kwargs(gen_kwargs or {}, default_max_gen_toks=self.max_gen_toks)
            text = self.greedy_text(context, options["until"], options["max_gen_toks"])
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs

    def greedy_text(self, context: str, until: list[str], max_gen_toks: int) -> str:
        # Leave room for the generated tokens inside the model's window, as lm-eval's HF model does.
        keep = max(1, self.max_length - max_gen_toks)
        prompt = (self.tok_encode(context) or [self.prefix_token_id])[-keep:]
        generated: list[int] = []
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            logits, cache = self.model(torch.tensor([prompt], device=self.device), use_cache=True)
            for _ in range(max_gen_toks):
                token = int(logits[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                if any(stop and stop in self.tok_decode(generated) for stop in until):
                    break
                logits, cache = self.model(torch.tensor([[token]], device=self.device), cache, use_cache=True)
        self.model.train(was_training)
        return postprocess_generated_text(self.tok_decode(generated), until, None)
