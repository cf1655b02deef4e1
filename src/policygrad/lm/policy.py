"""A transformers causal LM as a policy: an action is a token, a completion is a trajectory.

Batch layout: obs (B, P+T) = left-padded prompt ids then completion ids, obs_mask (B, P+T) their
attention mask, actions (B, T) = completion ids, mask (B, T) = 1 up to and including EOS.
Log-probabilities are computed from the hidden states at completion positions only, in chunks of
positions, so a full-vocabulary log-softmax of the whole batch never exists at once; the LM head's
logits are float32 even when the model runs under autocast (placement.py).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..batch import Batch
from .. import dist
from ..core.losses import batch_mean
from ..core.trpo import categorical_fisher_product, linearised
from ..placement import Placement
from . import adapters, models
from .generation import Generated, Sampling, TransformersGenerator, cache_name, completion_mask, repeated_cache


def chunked_log_probs(hidden: torch.Tensor, head: nn.Module, tokens: torch.Tensor, temperature: float,
                      chunk: int, with_entropy: bool, entropy_grad: bool
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(token) and (optionally) the entropy at each position from hidden states (B, T, H).

    The chosen logit minus the logsumexp equals the log-softmax entry; computed `chunk` positions
    at a time, only one (B, chunk, V) block of logits is alive outside autograd's saved tensors.
    """
    log_probs, entropies = [], []
    logits_of = float32_head(head)
    for start in range(0, hidden.shape[1], chunk):
        logits = logits_of(hidden[:, start:start + chunk]) / temperature          # (B, c, V)
        lse = torch.logsumexp(logits, dim=-1)                                    # (B, c)
        chosen = logits.gather(-1, tokens[:, start:start + chunk].unsqueeze(-1)).squeeze(-1)
        log_probs.append(chosen - lse)                                           # (B, c)
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                probs = torch.softmax(logits, dim=-1)                            # (B, c, V)
                entropies.append(lse - (probs * logits).sum(-1))                 # (B, c)
    return torch.cat(log_probs, 1), (torch.cat(entropies, 1) if with_entropy else None)


def float32_head(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head as a function of hidden states giving float32 logits, autocast off: a bfloat16
    logit of 10 is only good to +-0.04, an error every log-prob, ratio and KL would carry."""
    def no_autocast(fn, *args):
        with torch.autocast(device_type=args[0].device.type, enabled=False):
            return fn(*args)

    if type(head) is nn.Linear:
        weight, bias = head.weight.float(), None if head.bias is None else head.bias.float()
        return lambda h: no_autocast(nn.functional.linear, h.float(), weight, bias)
    dtype = next(head.parameters()).dtype  # an adapted head (LoRA on lm_head): its own forward
    return lambda h: no_autocast(head, h.to(dtype)).float()


@dataclass
class Reference:
    """The frozen reference policy: a model, and the context in which it computes the reference
    (with LoRA the policy's own model, adapter off or the starting adapter switched in)."""
    model: nn.Module
    switch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def frozen_copy(model: nn.Module, placement: Placement) -> Reference:
    """A full fine-tune's reference: a copy of the starting weights, stored in the compute dtype."""
    return Reference(copy.deepcopy(model).to(placement.frozen_dtype).eval().requires_grad_(False))


class LMPolicy(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, cfg, with_reference: bool = True,
                 placement: Optional[Placement] = None, reference: Optional[Reference] = None):
        """reference: the KL reference; without one, with_reference makes a frozen copy of model."""
        super().__init__()
        self.placement = placement or Placement(torch.device("cpu"), torch.float32)
        self.placement.configure_matmuls()
        self.model = model.eval()  # no dropout: sampling and learning see the same policy
        self.tokenizer = tokenizer
        if reference is None and with_reference:
            reference = frozen_copy(model, self.placement)
        self.reference = None if reference is None else reference.model
        self.reference_switch = contextlib.nullcontext if reference is None else reference.switch
        self.lora_dropout = getattr(cfg, "lora_dropout", 0.0) > 0
        self.checkpointing = cfg.gradient_checkpointing
        if self.checkpointing:
            # transformers checkpoints only in training mode; with every dropout at 0, training
            # mode computes exactly what eval mode does
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
            if hasattr(model.config, "attention_dropout"):
                model.config.attention_dropout = 0.0
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        hidden = model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1, device=self.placement.device) if cfg.use_value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.temperature = cfg.temperature
        self.chunk = cfg.logprob_chunk
        self.samples_per_prompt = cfg.samples_per_prompt
        self.share_prompts = cfg.share_prompts
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        # A chat template writes the model's special tokens itself; a plain prompt needs the
        # tokenizer's (a base model's BOS), as transformers' own pipelines add them.
        self.add_special_tokens = not getattr(tokenizer, "chat_template", None)
        self.generator = TransformersGenerator(model, tokenizer.pad_token_id, self.eos_ids, self.placement,
                                               self.share_prompts)
        self.sharded, self.is_gathered = False, False
        self.roots: dict[int, nn.Module] = {}

    # --- FSDP (dist.py) ---
    def shard(self) -> None:
        """Split the policy's and the reference's weights over the ranks (shard=fsdp)."""
        for model in (self.model, self.reference):
            if model is not None:
                self.roots[id(model)] = dist.fsdp_shard(model)
        self.sharded = True

    def _base(self, model: nn.Module) -> nn.Module:
        """What computes hidden states: the base model, or with sharded weights the root unit
        around it (whose forward gathers and afterwards scatters the gradients of the weights)."""
        return self.roots.get(id(model)) or model.base_model

    @contextlib.contextmanager
    def gathered(self):
        """Sampling, the reference's and evaluation passes run inside: with sharded weights each rank
        holds the whole model for the while and its passes need no other rank (one rank's sequences
        may take more decoding steps than another's); unsharded, nothing happens."""
        if not self.sharded or self.is_gathered:
            yield
            return
        with dist.gathered(*self.roots.values()):
            self.is_gathered = True
            try:
                yield
            finally:
                self.is_gathered = False

    # --- prompts and sampling ---
    def render(self, row: dict, **template_kwargs) -> str:
        """The text the model continues: the chat template for instruct models (template_kwargs:
        its tools=, say), else the prompt."""
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                      **template_kwargs)
        return row.get("prompt") or "\n".join(m["content"] for m in messages)

    def completion_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) 1 up to and including the first EOS."""
        return completion_mask(tokens, self.eos_ids)

    @torch.no_grad()
    def generate(self, texts: list[str], cfg, seed: int, samples_per_prompt: int = 1,
                 min_new_tokens: int = 0, model_defaults: bool = False) -> Batch:
        """Sample one completion per text (repeat texts for several: with runs of
        samples_per_prompt equal texts, each prompt is prefilled once); a Batch without rewards.
        model_defaults: add the model's own generation_config processors (reading only)."""
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=self.add_special_tokens)
        ids, attention = enc["input_ids"].to(self.placement.device), enc["attention_mask"].to(self.placement.device)
        sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, min_new_tokens=min_new_tokens, model_defaults=model_defaults)
        out = self.generator.generate(ids, attention, sampling, seed, samples_per_prompt)
        obs_mask = torch.cat([attention.float(), out.mask], 1)                  # (B, P+T)
        zeros = torch.zeros_like(out.mask)
        batch = Batch(obs=torch.cat([ids, out.tokens], 1), obs_mask=obs_mask, actions=out.tokens,
                      log_prob=out.log_prob, behaviour_log_prob=out.log_prob, rewards=zeros,
                      terminated=zeros, truncated=zeros, mask=out.mask)
        if not out.exact:
            # Under autocast the sampling pass's numbers differ from the training pass's by bfloat16
            # rounding (other kernels, a KV cache); the old log-probs come from the training pass
            # itself, so that a ratio is exactly 1 before the first step (as TRL and veRL recompute).
            batch = batch.replace(log_prob=self.log_prob(batch))
        return batch

    @torch.no_grad()
    def generate_ids(self, ids: torch.Tensor, attention: torch.Tensor, cfg, seed: int, max_new_tokens: int,
                     samples_per_prompt: int = 1, past=None, model_defaults: bool = False) -> Generated:
        """Sample a continuation of each row of token ids (a multi-turn conversation so far, kept as
        ids so that nothing is re-tokenised; attention 0 on padding, which may sit between turns);
        past: the previous turn's Generated.past, so only the new positions run."""
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, model_defaults=model_defaults)
        return self.generator.generate(ids, attention, sampling, seed, samples_per_prompt, past)

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(t[m.bool()], skip_special_tokens=True).strip()
                for t, m in zip(tokens, mask)]

    # --- forward passes ---
    def _hidden(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, T, H) hidden states at the positions that predict each completion token."""
        T = batch.actions.shape[1]
        model.train(model is self.model and self.checkpointing and torch.is_grad_enabled())
        self._dropout(model)
        attention = batch.obs_mask.long()
        positions = (attention.cumsum(1) - 1).clamp(min=0)  # left padding: count real tokens only
        out = self._base(model)(input_ids=batch.obs[:, :-1], attention_mask=attention[:, :-1],
                                position_ids=positions[:, :-1], use_cache=False)
        return out.last_hidden_state[:, -T:]                                     # (B, T, H)

    def _hidden_shared_prompts(self, model: nn.Module, batch: Batch, n: int) -> torch.Tensor:
        """As _hidden, for rows in runs of n completions of one prompt: each prompt goes through the
        model once, its KV cache is repeated n times (gradients flow back through the repeat) and
        only completion positions run per row. With 4 samples of a ~45-token chat prompt this skips
        about 40% of the tokens. Never checkpointed (a cache cannot pass a checkpointed layer): with
        gradient_checkpointing on, training passes take the plain pass instead."""
        T = batch.actions.shape[1]
        P = batch.obs.shape[1] - T
        attention = batch.obs_mask.long()
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        model.eval()
        self._dropout(model)
        prefix = self._base(model)(input_ids=batch.obs[::n, :P], attention_mask=attention[::n, :P],
                                   position_ids=positions[::n, :P], use_cache=True)
        last = prefix.last_hidden_state[:, -1:].repeat_interleave(n, 0)           # (B, 1, H)
        if T == 1:
            return last
        rest = self._base(model)(input_ids=batch.obs[:, P:-1], attention_mask=attention[:, :-1],
                                 position_ids=positions[:, P:-1], use_cache=True,
                                 **{cache_name(prefix): repeated_cache(prefix, n)})
        return torch.cat([last, rest.last_hidden_state], 1)                        # (B, T, H)

    def _dropout(self, model: nn.Module) -> None:
        if self.lora_dropout:
            adapters.set_dropout(model, training=torch.is_grad_enabled())

    def hidden_states(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with self.placement.autocast():
            return self._hidden_states(model, batch)

    def _hidden_states(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, T, H) at the positions that predict each completion token: the shared-prompt pass
        when the rows come in runs of samples_per_prompt copies of one prompt (a training batch),
        else the plain one (tests check they agree, values and gradients). A training pass with
        gradient_checkpointing on is always the plain, checkpointed one."""
        n, T = self.samples_per_prompt, batch.actions.shape[1]
        P = batch.obs.shape[1] - T
        if model is self.model and self.checkpointing and torch.is_grad_enabled():
            return self._hidden(model, batch)  # a KV cache cannot pass a checkpointed layer
        if self.sharded and not self.is_gathered:
            # every pass gathers each block's weights from all ranks: the ranks must make the same
            # number of passes, and the shared-prompt path's count depends on the rows
            return self._hidden(model, batch)
        if (self.share_prompts and n > 1 and batch.obs.shape[0] % n == 0
                and torch.equal(batch.obs[::n, :P].repeat_interleave(n, 0), batch.obs[:, :P])):
            return self._hidden_shared_prompts(model, batch, n)
        return self._hidden(model, batch)

    def _log_probs(self, model: nn.Module, batch: Batch, with_entropy: bool, entropy_grad: bool = False):
        hidden = self.hidden_states(model, batch)
        log_prob, entropy = chunked_log_probs(hidden, model.get_output_embeddings(), batch.actions,
                                              self.temperature, self.chunk, with_entropy, entropy_grad)
        return hidden, log_prob * batch.mask, entropy

    def evaluate(self, batch: Batch, entropy_grad: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        hidden, log_prob, entropy = self._log_probs(self.model, batch, True, entropy_grad)
        values = None if self.value_head is None else self.value_head(hidden.float()).squeeze(-1)  # (B, T)
        return log_prob, entropy, values

    def log_prob(self, batch: Batch) -> torch.Tensor:
        return self._log_probs(self.model, batch, False)[1]

    def data_log_prob(self, batch: Batch) -> torch.Tensor:
        """(B, T) log-probabilities of given tokens (real data: SFT, the PTX loss) under the model
        itself, at temperature 1 whatever the sampling temperature; 0 where mask is 0."""
        hidden = self.hidden_states(self.model, batch)
        log_prob, _ = chunked_log_probs(hidden, self.model.get_output_embeddings(), batch.actions, 1.0,
                                        self.chunk, False, False)
        return log_prob * batch.mask

    @torch.no_grad()
    def reference_log_prob(self, batch: Batch) -> torch.Tensor:
        with self.reference_switch():
            return self._log_probs(self.reference, batch, False)[1]

    @torch.no_grad()
    def value_features(self, batch: Batch) -> torch.Tensor:
        return self.hidden_states(self.model, batch)

    def values(self, batch: Batch) -> torch.Tensor:
        """(B, T) value-head outputs; only the head gets gradients (TRPO's critic regression)."""
        return self.value_head(self.value_features(batch).float()).squeeze(-1)

    def rows(self, batch: Batch) -> Batch:
        return batch  # minibatches are cut from whole completions

    # --- TRPO: exact KL over the vocabulary ---
    @torch.no_grad()
    def snapshot_actor(self, batch: Batch) -> torch.Tensor:
        """(B, T, V) log-probabilities over the vocabulary before the step."""
        hidden = self.hidden_states(self.model, batch)
        logits_of = float32_head(self.model.get_output_embeddings())
        return torch.cat([torch.log_softmax(logits_of(hidden[:, s:s + self.chunk]) / self.temperature, -1)
                          for s in range(0, hidden.shape[1], self.chunk)], 1)

    def log_prob_and_kl(self, batch: Batch, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log_prob (B, T) and the mean over completion tokens of KL(old || new), summed exactly
        over the vocabulary, from one forward pass."""
        hidden = self.hidden_states(self.model, batch)
        logits_of = float32_head(self.model.get_output_embeddings())
        kls, log_probs = [], []
        for s in range(0, hidden.shape[1], self.chunk):
            new = torch.log_softmax(logits_of(hidden[:, s:s + self.chunk]) / self.temperature, -1)
            old_c = old[:, s:s + self.chunk]
            kls.append((old_c.exp() * (old_c - new)).sum(-1))                   # (B, c)
            log_probs.append(new.gather(-1, batch.actions[:, s:s + self.chunk].unsqueeze(-1)).squeeze(-1))
        return torch.cat(log_probs, 1) * batch.mask, batch_mean(torch.cat(kls, 1), batch)

    def kl(self, batch: Batch, old: torch.Tensor) -> torch.Tensor:
        return self.log_prob_and_kl(batch, old)[1]

    def fisher_outputs(self, batch: Batch, tangents: list[torch.Tensor]
                       ) -> tuple[tuple[torch.Tensor], tuple[torch.Tensor]]:
        """TRPO's Gauss-Newton product (core.trpo.Linearised): the logits / temperature (B, T, V),
        with graph, and H J v beside them, H the Fisher of each token's softmax weighted as kl's
        mean; tangents: one per actor parameter. The whole (B, T, V) block exists at once, as in
        snapshot_actor; J v needs eager attention (torch's fused kernels have no forward mode)."""
        def logits() -> torch.Tensor:
            hidden = self.hidden_states(self.model, batch)
            return float32_head(self.model.get_output_embeddings())(hidden) / self.temperature
        if self.checkpointing or self.sharded:
            # J v in a pass of its own, no graph: a checkpointed layer's recomputation would drop the
            # tangents, and fully_shard's hooks gather weights but not tangents, so with sharded
            # weights it runs on gathered ones, tangents gathered alike (dist.whole); then z in a
            # plain pass, whose backward reduce-scatters the product (dist.shard_gradient)
            whole = [dist.whole(t, p) for t, p in zip(tangents, self.actor_parameters())]
            with torch.no_grad(), self.gathered():
                jv = linearised(self.model, self.actor_parameters(), whole, logits)[1]
            z = logits()
        else:
            z, jv = linearised(self.model, self.actor_parameters(), tangents, logits)  # (B, T, V) x 2
        return (z,), (categorical_fisher_product(z.detach(), jv, batch.mask / batch.n_valid),)

    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        return [] if self.value_head is None else list(self.value_head.parameters())

    def optimizer_groups(self, cfg) -> list[tuple[list[nn.Parameter], float]]:
        """The LM at cfg.lr; the value head, if any, at its own cfg.value_lr."""
        groups = [(self.actor_parameters(), cfg.lr)]
        return groups + ([(self.critic_parameters(), cfg.value_lr)] if self.value_head is not None else [])


def build_policy(cfg, placement: Placement, seed: int, model_path=None, with_reference: bool = True
                 ) -> tuple[LMPolicy, Optional[adapters.Adapted]]:
    """The policy and its KL reference (and, with LoRA, the adapter's handle). Full fine-tuning:
    float32 weights to train and a frozen copy of the starting model (in the compute dtype) as the
    reference; model_path, a trained checkpoint's policy/ folder, is loaded to train or evaluate
    further, the reference staying the base model. LoRA: the base model in the compute dtype with a
    float32 adapter (new, the adapter= folder's, or model_path's trained one); the reference is the
    same model with the adapter off or the starting adapter switched in. with_reference=False
    (supervised fine-tuning): a full fine-tune has no frozen copy."""
    if cfg.uses_lora:
        base, tokenizer = models.load(cfg.model, placement.frozen_dtype, placement.device)
        cuda = [placement.device.index or 0] if placement.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # a new adapter's A draws from the run's seed
            torch.manual_seed(seed)
            adapted = adapters.attach(base, cfg, trained=model_path)
        reference = Reference(adapted.model, adapted.reference())
        return LMPolicy(adapted.model, tokenizer, cfg, placement=placement, reference=reference), adapted
    if model_path is None or not with_reference:
        model, tokenizer = models.load(str(model_path or cfg.model), placement.trainable_dtype, placement.device)
        policy = LMPolicy(model, tokenizer, cfg, placement=placement, with_reference=with_reference)
    else:
        trained, tokenizer = models.load(str(model_path), placement.trainable_dtype, placement.device)
        base, _ = models.load(cfg.model, placement.frozen_dtype, placement.device)
        reference = Reference(base.eval().requires_grad_(False))
        policy = LMPolicy(trained, tokenizer, cfg, placement=placement, reference=reference)
    if cfg.shard == "fsdp" and dist.world() > 1:
        policy.shard()
    return policy, None


def policy_files(policy, adapted) -> dict[str, dict[str, torch.Tensor]]:
    """The policy's weights as policy/model.safetensors, by reference (the caller waits for the
    write before it next changes them); tied weights once, as save_pretrained stores them. With
    LoRA, only the adapter: policy/adapter_model.safetensors (the base model is the config's)."""
    if adapted is not None:
        return {f"policy/{adapters.ADAPTER_WEIGHTS}": adapted.trainable_tensors()}
    if policy.sharded:  # gathered whole onto rank 0 (every rank must call this)
        weights = dist.full_state_dict(policy.model)
        if getattr(policy.model.config, "tie_word_embeddings", False):
            head = next(n for n, m in policy.model.named_modules() if m is policy.model.get_output_embeddings())
            weights.pop(f"{head}.weight", None)
        return {"policy/model.safetensors": weights}
    seen, weights = set(), {}
    for name, t in policy.model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            weights[name] = t.detach()
    return {"policy/model.safetensors": weights}


def write_policy_config(policy, adapted, base_model: str, folder: Path) -> None:
    """Beside policy/model.safetensors: config, generation config and tokenizer, so that plain
    transformers loads it: AutoModelForCausalLM.from_pretrained(folder / "policy") (with LoRA,
    PeftModel.from_pretrained(base, folder / "policy"))."""
    model, target = policy.model, folder / "policy"
    target.mkdir(parents=True, exist_ok=True)
    if adapted is not None:
        adapted.write_config(target, str(models.resolve(base_model)))
        policy.tokenizer.save_pretrained(target)
        return
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(target)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(target)
    policy.tokenizer.save_pretrained(target)
