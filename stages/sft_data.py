"""`opd sft`'s data: a file of documents, chat messages or prompt/response pairs, tokenized with the
student's tokenizer into (prompt, response) id pairs, and the micro-batches the learner reads.

A sample is fed as prompt + response without its last token, like a rollout row (stages/train_data.py),
and its response tokens are learned (cross-entropy): a document is all response after its first token;
a chat row's last message (the assistant's) is the response, the messages before it its prompt; a
prompt/response row is one user message and its answer. Prompts are rendered as the rollouts render them
(the chat template with the generation prompt when rollout.chat_template is on, else the plain text),
and a response ends with what closes the turn (the template's own end-of-turn tokens, else EOS).

Shape legend: S samples, B rows of a micro-batch, L its padded length, N its response positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from opd.cache.errors import OpdError, first_line
from opd.configs.schema import OpdConfig
from opd.stages.prompts import check_messages, iter_rows, plain_text, prompts_hash
from opd.stages.rollout_rows import reference_ids
from opd.stages.train_data import Item


class SftData:
    """The tokenized data file, every row checked (one-line errors naming the file and line). Arrays over
    the S samples, as the planner (train_data.plan_steps) reads them: `length_S` (fed tokens, P + T − 1)
    and `tokens_S` (T, the learned tokens)."""

    top_k = 0  # no teacher: the learner's top-k metrics are off

    def __init__(self, cfg: OpdConfig, path: str, tokenizer, tokenizer_dir: str):
        self.path, self.sft = path, cfg.sft
        self.chat_template = cfg.rollout.chat_template
        self.tokenizer, self.tokenizer_dir = tokenizer, tokenizer_dir
        self.prompts: list[list[int]] = []
        self.responses: list[list[int]] = []
        self.cut = 0  # samples cut at sft.max_tokens
        kinds = {"text": 0, "chat": 0}
        for where, row in iter_rows(path, "--data / sft.data", "SFT data"):
            kind, prompt, response = self._tokenize(where, row)
            kinds[kind] += 1
            room = self.sft.max_tokens - len(prompt)
            if room < 1:
                raise OpdError(
                    f"{where}: its prompt has {len(prompt)} tokens, sft.max_tokens = {self.sft.max_tokens} leaves "
                    f"no room for the response; raise sft.max_tokens or shorten the prompt"
                )
            if len(response) > room:
                response, self.cut = response[:room], self.cut + 1
            self.prompts.append(prompt)
            self.responses.append(response)
        if not self.prompts:
            raise OpdError(f"{path}: no rows (the SFT data file is empty)")
        self.documents, self.chats = kinds["text"], kinds["chat"]
        self.tokens_S = np.asarray([len(r) for r in self.responses], dtype=np.int64)
        self.length_S = np.asarray([len(p) + len(r) - 1 for p, r in zip(self.prompts, self.responses)], np.int64)
        self.digest = prompts_hash(path)  # sha256 of the file (of every file of a dataset folder)

    def __len__(self) -> int:
        return len(self.prompts)

    def _tokenize(self, where: str, row: Any) -> tuple[str, list[int], list[int]]:
        """("text" | "chat", prompt ids, response ids) of one row."""
        sft = self.sft
        if not isinstance(row, dict):
            raise OpdError(f"{where}: an SFT row must be a JSON object, got {type(row).__name__}")
        if row.get(sft.messages_field) is not None:
            return "chat", *self._chat(where, check_messages(row[sft.messages_field], where, sft.messages_field))
        if row.get(sft.prompt_field) is not None or row.get(sft.response_field) is not None:
            prompt, response = _text(where, row, sft.prompt_field), _text(where, row, sft.response_field)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return "chat", *self._chat(where, messages)
        if row.get(sft.text_field) is not None:
            ids = [int(t) for t in self.tokenizer(_text(where, row, sft.text_field))["input_ids"]]
            if self.tokenizer.eos_token_id is not None:  # as a rollout's completion ends
                ids.append(int(self.tokenizer.eos_token_id))
            if len(ids) < 2:
                raise OpdError(f"{where}: '{sft.text_field}' is a single token; there is nothing to learn from it")
            return "text", ids[:1], ids[1:]
        raise OpdError(
            f"{where}: has none of '{sft.text_field}', '{sft.messages_field}' or '{sft.prompt_field}' + "
            f"'{sft.response_field}' (set sft.text_field / sft.messages_field / sft.prompt_field)"
        )

    def _chat(self, where: str, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Prompt and response ids of chat messages whose last is the assistant's."""
        tok = self.tokenizer
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise OpdError(
                f"{where}: the last message must be the assistant's, after at least one other (it is what is learned)"
            )
        answer = messages[-1]["content"]
        if not self.chat_template:
            prompt = tok(plain_text(messages[:-1]))["input_ids"]
            return [int(t) for t in prompt], reference_ids(tok, answer)
        if not getattr(tok, "chat_template", None):
            raise OpdError(
                f"{self.tokenizer_dir}: the student tokenizer has no chat template; set rollout.chat_template = "
                f"false to learn chat rows as plain text"
            )
        try:
            head = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
            whole = tok.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # jinja template errors (e.g. roles the template refuses)
            raise OpdError(f"{where}: the chat template refused these messages ({first_line(e)})") from None
        prompt = [int(t) for t in tok(head, add_special_tokens=False)["input_ids"]]
        if whole.startswith(head) and answer in whole[len(head) :]:  # the template's own end of turn
            return prompt, [int(t) for t in tok(whole[len(head) :], add_special_tokens=False)["input_ids"]]
        return prompt, reference_ids(tok, answer)


def _text(where: str, row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise OpdError(f"{where}: '{field}' must be a non-empty string, got {value!r:.60}")
    return value


class SftBatches(torch.utils.data.Dataset):
    """This process's micro-batches of SFT samples, in order, with the keys the learner and its step sums
    read (stages/train_data.MicroBatches); `cross_entropy` tells the learner to learn the data's tokens.
    The cache's columns are empty (K = 0) and no row has sampling log-probs."""

    def __init__(self, data: SftData, items: list[Item], pad_id: int = 0):
        self.data, self.items, self.pad_id = data, items, pad_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item, data = self.items[index], self.data
        rows = item.samples
        B, L = len(rows), int(data.length_S[rows].max())
        input_ids_BL = np.full((B, L), self.pad_id, dtype=np.int64)
        gather, target = [], []
        for b, i in enumerate(rows.tolist()):
            prompt, response = data.prompts[i], data.responses[i]
            P, T = len(prompt), len(response)
            input_ids_BL[b, :P] = prompt
            input_ids_BL[b, P : P + T - 1] = response[:-1]
            gather.append(b * L + P - 1 + np.arange(T))
            target.append(np.asarray(response, dtype=np.int64))
        target_N = torch.from_numpy(np.concatenate(target))
        N = int(target_N.shape[0])
        return {
            "input_ids_BL": torch.from_numpy(input_ids_BL),
            "gather_N": torch.from_numpy(np.concatenate(gather).astype(np.int64)),
            "target_N": target_N,
            "topk_ids_NK": torch.zeros((N, 0), dtype=torch.int64),
            "topk_logprobs_NK": torch.zeros((N, 0), dtype=torch.float32),
            "tail_N": torch.zeros(N, dtype=torch.float32),
            "taken_N": torch.zeros(N, dtype=torch.float32),
            "sampling_N": torch.full((N,), float("nan"), dtype=torch.float32),
            "on_policy_N": torch.ones(N, dtype=torch.bool),
            "cross_entropy": True,
            "tokens": N,
            "padded_tokens": B * L,
            "real_tokens": int(data.length_S[rows].sum()),
            "weight": float(item.weight),
        }
