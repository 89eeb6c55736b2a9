"""One hospital's side of federated training, without Flower: its config, its data, its model
(shared weights from the server + its own rater heads), one round of training, evaluation.

The ClientApp (``client/app.py``) only unpacks messages and calls this.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from mrprism_core.checkpoint import (
    CorruptCheckpointError,
    load_checkpoint,
    shared_weights_from_checkpoint,
)
from mrprism_core.data.factory import (
    SPLITS,
    DatasetInfo,
    DataValidationError,
    EmptySplitError,
    build_dataset,
    dataset_info,
)
from mrprism_core.data.files import FileDataset, RaterAgreement
from mrprism_core.data.views import CaseSubset
from mrprism_core.drift_correction import GradientCorrection, control_change, local_correction
from mrprism_core.local_training import FedProx, HeadsOnly, local_strategy, run_epochs
from mrprism_core.lr_schedule import set_lr
from mrprism_core.models import (
    SegmentationModel,
    build_model_for_data,
    model_from_build_args,
    spec_from_build_args,
    split_state,
)
from mrprism_core.personalization import check_personalization
from mrprism_core.rater_quality import RaterAssessment, annotation_quality, assess_raters
from mrprism_core.rater_report import write_rater_report
from mrprism_core.train import evaluate, make_loader, preset_lr, resolve_device

from .privacy import PrivacyConfig, PrivacyLedger, PrivateRound
from .site_config import SiteDataError
from .state import PRIVACY_LEDGER, SiteStore

log = logging.getLogger(__name__)

__all__ = ["SiteSummary", "SiteRuntime"]


@dataclass(frozen=True)
class SiteSummary:
    """What ``python -m client --site X --check`` prints."""

    site: str
    cases: dict[str, int]
    info: DatasetInfo
    snapshot: str = "none yet (fresh rater heads)"
    privacy: str = "off"
    agreement: str = "n/a"

    def lines(self) -> list[str]:
        cases = ", ".join(f"{split} {count}" for split, count in self.cases.items())
        return [
            f"site:        {self.site}",
            f"cases:       {cases}",
            f"raters:      {self.info.num_raters}",
            f"classes:     {self.info.num_classes}",
            f"channels:    {self.info.in_channels}",
            f"image size:  {self.info.image_size} x {self.info.image_size}",
            f"agreement:   {self.agreement}",
            f"snapshot:    {self.snapshot}",
            f"privacy:     {self.privacy}",
        ]


def _validate_with_progress(dataset: FileDataset, label: str) -> dict[str, Any]:
    from tqdm import tqdm

    with tqdm(total=len(dataset.cases), desc=f"checking {label}", unit="case", leave=False) as bar:
        return dataset.validate(progress=lambda: bar.update())


def _agreement(dataset: Dataset, limit: int = 256) -> list[float | None]:
    """Mean pairwise rater Dice per class over (up to ``limit``) training samples."""
    agreement = RaterAgreement()
    for index in range(min(len(dataset), limit)):  # type: ignore[arg-type]
        agreement.add(dataset[index]["raters"].numpy()[None])
    return agreement.mean()


def _describe_agreement(dice: Sequence[float | None], classes: Sequence[str] | None) -> str:
    """``mean pairwise rater Dice: disc 0.93, cup 0.81``."""
    if not dice:
        return "n/a"
    names = list(classes or [f"class {k}" for k in range(len(dice))])
    parts = [f"{name} {'n/a' if v is None else f'{v:.3f}'}" for name, v in zip(names, dice)]
    return "mean pairwise rater Dice (train): " + ", ".join(parts)


class SiteRuntime:
    """A site's config, data and model files; the unit the ClientApp and simulation drive."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        state_dir: str | Path | None = None,
        *,
        write_behind: bool = False,
    ) -> None:
        """``write_behind``: the site worker's store, which writes state in the background."""
        self.cfg = dict(cfg)
        self.name = str(self.cfg["site"])
        root = state_dir if state_dir is not None else self.cfg["state_dir"]
        self.store = SiteStore(root, write_behind=write_behind)
        self.seed = int(self.cfg.get("seed", 0))
        self.device = resolve_device(str(self.cfg.get("device", "auto")))
        if self.cfg.get("threads"):
            # several torch processes on one machine, each with a thread per core, spin against
            # each other: two sites training at once on 2 cores took 288 s instead of 2 s
            torch.set_num_threads(int(self.cfg["threads"]))
        self._datasets: dict[str, Dataset] = {}

    @classmethod
    def from_state_dir(cls, state_dir: str | Path, *, write_behind: bool = False) -> SiteRuntime:
        """Open the site whose resolved config ``python -m client`` (or the simulation)
        wrote into ``state_dir``."""
        from omegaconf import OmegaConf

        store = SiteStore(state_dir)
        if not store.config_path.exists():
            raise SiteDataError(
                f"no site config at {store.config_path}: start this SuperNode with "
                "`python -m client --site NAME`, which writes it"
            )
        cfg = OmegaConf.to_container(OmegaConf.load(store.config_path), resolve=True)
        return cls(cfg, state_dir, write_behind=write_behind)  # type: ignore[arg-type]

    # --- data -------------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = build_dataset(self.cfg["data"], split)
        return self._datasets[split]

    @functools.cached_property
    def info(self) -> DatasetInfo:
        return dataset_info(self.dataset("train"))

    def loader(self, split: str, *, shuffle: bool, seed: int = 0) -> DataLoader:
        """Batches of ``split`` (or of every split, ``all``) at the site's batch size, the cases
        as drawn (training uses :meth:`training_loader`)."""
        return self._batches(self._cases_of(split), shuffle=shuffle, seed=seed)

    def training_loader(self, seed: int, cases: Dataset | None = None) -> DataLoader:
        """Shuffled batches of the training split (or of ``cases``), each case flipped and
        turned at random when the site config sets ``train.augment: true``."""
        augment = bool(self.cfg.get("train", {}).get("augment", False))
        cases = self.dataset("train") if cases is None else cases
        return self._batches(cases, shuffle=True, seed=seed, augment=augment)

    def _batches(
        self, cases: Dataset, *, shuffle: bool, seed: int, augment: bool = False
    ) -> DataLoader:
        """``make_loader`` at the site config's batch size and worker count."""
        train_cfg = self.cfg.get("train", {})
        return make_loader(
            cases,
            int(train_cfg.get("batch_size", 8)),
            shuffle=shuffle,
            seed=seed,
            num_workers=int(train_cfg.get("num_workers", 0)),
            augment=augment,
        )

    def check(self) -> SiteSummary:
        """Validate every case of every split the data declares (decoding each file once, which
        also fills the preprocessing cache); raise once with a message naming the file."""
        cases: dict[str, int] = {}
        agreement: list[float | None] | None = None
        try:
            for split in SPLITS:
                try:
                    dataset = self.dataset(split)
                except EmptySplitError:
                    if split == "train":
                        raise
                    continue
                cases[split] = len(dataset)
                if isinstance(dataset, FileDataset):
                    report = _validate_with_progress(dataset, f"{self.name} {split}")
                    if split == "train":
                        agreement = report["rater_dice"]
                info = dataset_info(dataset)
                if split != "train" and info != self.info:
                    raise SiteDataError(
                        f"site {self.name}: split {split} has {info}, train has {self.info}"
                    )
        except EmptySplitError as err:
            raise SiteDataError(f"site {self.name}: no training cases ({err})") from err
        except SiteDataError:
            raise
        except DataValidationError as err:
            raise SiteDataError(f"site {self.name}: {err}") from err
        except (KeyError, TypeError, ValueError) as err:
            raise SiteDataError(
                f"site {self.name}: data config {self.cfg.get('data')}: {err}"
            ) from err
        if agreement is None:
            agreement = _agreement(self.dataset("train"))
        return SiteSummary(
            self.name,
            cases,
            self.info,
            self._describe_snapshot(),
            self._describe_privacy(),
            _describe_agreement(agreement, self.cfg["data"].get("classes")),
        )

    @functools.cached_property
    def privacy(self) -> PrivacyConfig:
        """The site's DP-SGD settings (``privacy`` block), checked once."""
        try:
            return PrivacyConfig.from_mapping(self.cfg.get("privacy"))
        except (TypeError, ValueError) as err:
            raise SiteDataError(f"site {self.name}: {err}") from err

    def _private_round(self, planned_epochs: int) -> PrivateRound | None:
        if not self.privacy.enabled:
            return None
        return PrivateRound(self.privacy, self._ledger, planned_epochs)

    @property
    def _ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.store.root / PRIVACY_LEDGER)

    def _describe_privacy(self) -> str:
        cfg = self.privacy
        if not cfg.enabled:
            return "off"
        budget = (
            f"target epsilon {cfg.target_epsilon}"
            if cfg.target_epsilon is not None
            else f"noise multiplier {cfg.noise_multiplier}"
        )
        spent = PrivateRound(cfg, self._ledger, 1).spent()
        return f"DP-SGD, {budget} at delta {cfg.delta}; epsilon spent so far {spent:.3f}"

    def _describe_snapshot(self) -> str:
        snapshot = self._snapshot_or_error()
        if snapshot is None:
            return SiteSummary.snapshot
        return (
            f"round {snapshot['round']} of run {snapshot['run_id']}, saved "
            f"{snapshot['saved_at']} ({self.store.snapshot_path})"
        )

    # --- model ------------------------------------------------------------------------
    @functools.cached_property
    def snapshot(self) -> dict[str, Any] | None:
        """The site's last saved model (rater heads + shared weights), None before round 1.

        Raises:
            CorruptCheckpointError: the file is damaged; it is never replaced silently.
        """
        return self.store.load_snapshot()

    @property
    def heads_round(self) -> int:
        """The round whose rater heads this site starts from (0: fresh heads)."""
        return int(self.snapshot["round"]) if self.snapshot is not None else 0

    def personal_model(self) -> SegmentationModel:
        """The site's complete personalised model from its snapshot: the last shared weights
        it received plus its own rater heads (or, after Ditto rounds, its personal model);
        what it predicts new cases with."""
        snapshot = self._snapshot_or_error()
        if snapshot is None:
            raise SiteDataError(
                f"site {self.name}: no model yet ({self.store.snapshot_path} does not exist); "
                "the site gets one when it has trained in at least one federated round"
            )
        model = model_from_build_args(snapshot["build_args"])
        model.load_state_dict({**snapshot["shared_state"], **snapshot["local_state"]})
        personalization = "ditto" if self.store.personal_path.exists() else "fedper"
        return self.evaluated_model(model.to(self.device), personalization)

    def describe(self) -> list[str]:
        """What ``python -m client --site X --info`` prints."""
        snapshot = self._snapshot_or_error()
        lines = [f"site:        {self.name}", f"state dir:   {self.store.root}"]
        if snapshot is None:
            return [*lines, "snapshot:    none yet (the site has not trained a round)"]
        args = snapshot["build_args"]
        return [
            *lines,
            f"snapshot:    {self.store.snapshot_path}",
            f"round:       {snapshot['round']}",
            f"run:         {snapshot['run_id']}",
            f"saved:       {snapshot['saved_at']}",
            f"model:       {args.get('name')} ({args.get('preset')} preset, "
            f"{args.get('image_size')} px, {args.get('in_channels')} channel(s))",
            f"raters:      {args.get('num_raters')}",
            f"classes:     {args.get('num_classes')}",
            f"privacy:     {self._describe_privacy()}",
        ]

    def _snapshot_or_error(self) -> dict[str, Any] | None:
        try:
            return self.snapshot
        except CorruptCheckpointError as err:
            raise SiteDataError(f"site {self.name}: {err}") from err

    def build_model(self, spec: Mapping[str, Any]) -> SegmentationModel:
        """The run's architecture with this site's rater heads restored from its snapshot
        (freshly initialised from the site seed before the first round)."""
        torch.manual_seed(self.seed)  # the site's heads start the same way every time
        model = build_model_for_data(spec, self.info)
        if self.snapshot is not None:
            _, expected = split_state(model)
            local = self.snapshot["local_state"]
            if {k: tuple(v.shape) for k, v in local.items()} != {
                k: tuple(v.shape) for k, v in expected.items()
            }:
                raise SiteDataError(
                    f"{self.store.snapshot_path} holds rater heads of another model "
                    f"({self.snapshot['build_args']}); move it away to start this site afresh"
                )
            model.load_state_dict(local, strict=False)
        return model.to(self.device)

    def load_shared(self, model: SegmentationModel, shared: Mapping[str, torch.Tensor]) -> None:
        """Load the server's shared weights; the keys must be exactly the shared ones."""
        expected, _ = split_state(model)
        if set(shared) != set(expected):
            missing = sorted(set(expected) - set(shared))[:3]
            extra = sorted(set(shared) - set(expected))[:3]
            raise ValueError(
                f"site {self.name}: the server's weights do not match this site's model "
                f"(missing {missing}, unexpected {extra}); are both on the same model spec?"
            )
        model.load_state_dict(dict(shared), strict=False)

    def forget_saved_state(self) -> None:
        """Read the snapshot from disk again when next needed (a long-lived site worker calls
        this per message: ``--adapt`` or a restore may have replaced the file meanwhile)."""
        self.__dict__.pop("snapshot", None)

    def save(self, model: SegmentationModel, *, server_round: int, run_id: int) -> None:
        shared, local = split_state(model)
        self.forget_saved_state()  # the cached copy is stale from here on
        self.store.save_snapshot(
            site=self.name,
            build_args=model.build_args,
            local_state={k: v.detach().cpu() for k, v in local.items()},
            shared_state={k: v.detach().cpu() for k, v in shared.items()},
            server_round=server_round,
            run_id=run_id,
        )

    # --- one round ----------------------------------------------------------------------
    def round_seed(self, run_seed: int, server_round: int) -> int:
        return run_seed * 1_000_003 + self.seed * 1_009 + server_round

    def train(
        self,
        model: SegmentationModel,
        *,
        local_epochs: int,
        lr: float,
        seed: int,
        proximal_mu: float = 0.0,
        planned_rounds: int = 1,
        persist_optimizer: bool = True,
        server_round: int = 0,
        personalization: str = "fedper",
        ditto_lambda: float = 0.1,
        server_control: Mapping[str, torch.Tensor] | None = None,
        control_ledger: str = "",
    ) -> dict[str, Any]:
        """``local_epochs`` passes of :func:`~mrprism_core.local_training.run_epochs` with the
        strategy for this round (:func:`~mrprism_core.local_training.local_strategy`: FedProx
        when ``proximal_mu``, the phases of ``personalization``; with the site's
        ``privacy.enabled``, DP-SGD, and the spent epsilon is in the result). With
        ``persist_optimizer`` the Adam state is read from and written back to the site's
        state directory. With ``ditto`` the site's personal model trains afterwards.

        With ``server_control`` (SCAFFOLD, :mod:`mrprism_core.drift_correction`; the server's
        control variate, per shared tensor, named ``control_ledger``) each step is corrected by
        it minus the site's own; the site's new control variate is saved and its change, what
        the server folds into its mean, is returned under ``"control_change"``."""
        torch.manual_seed(seed)
        check_personalization(personalization)
        # the weights as received: FedProx's and Ditto's anchor, Ditto's first personal model
        received: dict[str, torch.Tensor] = {}
        if proximal_mu or personalization == "ditto":
            received = {k: v.detach().clone() for k, v in model.state_dict().items()}
        shared_keys = set(split_state(model)[0])
        reference = {k: v for k, v in received.items() if k in shared_keys} or None
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        private = self._private_round(planned_rounds * local_epochs)
        try:
            strategy = local_strategy(
                personalization, proximal_mu, reference, private=private is not None
            )
        except ValueError as err:
            raise SiteDataError(f"site {self.name}: {err}") from err
        # Adam's moments carry over from the site's last round (a fresh Adam every round
        # re-runs its warm-up on every site); DP-SGD rounds start afresh: Opacus' optimizer
        # owns the noise and its state is not ours to carry
        keep_optimizer = persist_optimizer and private is None
        if keep_optimizer:
            self._restore_optimizer(optimizer, lr)
        if server_control is not None and private is not None:
            raise SiteDataError(
                f"site {self.name}: drift-correction=scaffold would send the site's mean "
                "gradient, which DP-SGD does not protect; run without one of the two"
            )
        drift = None
        site_control = None
        if server_control is not None:
            site_control = self._site_control(control_ledger)
            correction = local_correction(server_control, site_control)
            drift = GradientCorrection(model, optimizer, shared_keys, correction)
        if private is not None:
            optimizer, dp_loader = private.wrap(
                model, optimizer, self.training_loader(seed), local_epochs
            )
        try:
            with drift or contextlib.nullcontext():
                totals: dict[str, Any] = run_epochs(
                    model,
                    optimizer,
                    (lambda _: dp_loader)
                    if private is not None
                    else (lambda epoch: self.training_loader(seed + epoch)),
                    self.device,
                    local_epochs,
                    strategy,
                )
        finally:  # the accountant books the noisy steps taken, even when a step failed
            spent = private.finish() if private is not None else {}
        totals.update(spent)
        totals["num_examples"] = len(self.dataset("train"))
        if keep_optimizer:
            self.store.save_optimizer(optimizer.state_dict(), server_round=server_round)
        if drift is not None:
            new_control = drift.mean_gradients()
            totals["control_change"] = control_change(new_control, site_control)
            self.store.save_control(new_control, server_round=server_round, ledger=control_ledger)
        if personalization == "ditto":
            totals["personal_loss"] = self._train_personal(
                model, received, reference or {}, local_epochs, lr, seed, ditto_lambda, server_round
            )
        return totals

    def _train_personal(
        self,
        model: SegmentationModel,
        received: Mapping[str, torch.Tensor],
        global_shared: Mapping[str, torch.Tensor],
        local_epochs: int,
        lr: float,
        seed: int,
        ditto_lambda: float,
        server_round: int,
    ) -> float:
        """Ditto: ``local_epochs`` on the site's personal model, pulled toward the global
        weights received this round; saved in the state dir, never sent."""
        personal = model_from_build_args(model.build_args).to(self.device)
        # the first round: the personal model starts from what the site received
        personal.load_state_dict(self._personal_state(model.build_args) or dict(received))
        optimizer = torch.optim.Adam(personal.parameters(), lr=lr)
        result = run_epochs(
            personal,
            optimizer,
            lambda epoch: self.training_loader(seed + 7_919 + epoch),
            self.device,
            local_epochs,
            FedProx(mu=ditto_lambda, reference=global_shared),
        )
        state = {k: v.detach().cpu() for k, v in personal.state_dict().items()}
        self.store.save_personal(model.build_args, state, server_round=server_round)
        return result["loss"]

    def evaluated_model(self, model: SegmentationModel, personalization: str) -> SegmentationModel:
        """What the site scores and predicts with: Ditto's personal model once it has one,
        else ``model`` (the received shared weights with this site's heads)."""
        state = self._personal_state(model.build_args) if personalization == "ditto" else None
        if state is None:
            return model
        personal = model_from_build_args(model.build_args)
        personal.load_state_dict(state)
        return personal.to(self.device)

    def _personal_state(self, build_args: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """Ditto's saved personal weights when they belong to this architecture, else None."""
        saved = self.store.load_personal()
        if saved is None or saved["build_args"] != build_args:
            return None
        return saved["model_state"]

    def _site_control(self, ledger: str) -> dict[str, torch.Tensor] | None:
        """The site's control variate of its last round in ``ledger`` (None: none yet, another
        run's, or unreadable)."""
        try:
            return self.store.load_control(ledger)
        except CorruptCheckpointError as err:
            log.warning("site %s: %s; taking plain steps this round", self.name, err)
            return None

    def _restore_optimizer(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Load the saved Adam state when it fits this model (same parameters, same shapes);
        otherwise keep the fresh optimizer and say why."""
        try:
            saved = self.store.load_optimizer()
        except CorruptCheckpointError as err:
            log.warning("site %s: %s; starting a fresh optimizer", self.name, err)
            return
        if saved is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        moments = saved.get("state", {})
        fits = len(saved["param_groups"][0]["params"]) == len(params) and all(
            tuple(moments[i]["exp_avg"].shape) == tuple(p.shape)
            for i, p in enumerate(params)
            if i in moments
        )
        if not fits:
            log.warning(
                "site %s: %s belongs to another model; starting a fresh optimizer",
                self.name,
                self.store.optimizer_path,
            )
            return
        optimizer.load_state_dict(saved)
        set_lr(optimizer, lr)  # this round's learning rate, not the saved one

    # --- onboarding -----------------------------------------------------------------------
    def adapt(
        self, *, cases: int | None, epochs: int, lr: float | None, source: str | None = None
    ) -> dict[str, Any]:
        """Onboarding a new site or rater: train only this site's own modules (rater heads
        and identities) on its first ``cases`` training cases, the shared weights frozen,
        and save the result as the site's snapshot.

        The shared weights come from ``source`` (a federation's ``global_model.pt`` or a
        centralized ``last.pt``/``best.pt``) or else from the site's snapshot. Saved heads
        that fit are adapted further; a changed rater count starts fresh heads.
        """
        if epochs < 1:
            raise SiteDataError(f"site {self.name}: --adapt needs at least one epoch, got {epochs}")
        snapshot = self._snapshot_or_error()
        if source is not None:
            payload = load_checkpoint(source)
            spec = payload.get("model_spec") or spec_from_build_args(payload["build_args"])
        elif snapshot is not None:
            spec = spec_from_build_args(snapshot["build_args"])
        else:
            raise SiteDataError(
                f"site {self.name}: nothing to adapt from: no snapshot in {self.store.root}; "
                "pass --from with the federation's global_model.pt"
            )
        torch.manual_seed(self.seed)
        model = build_model_for_data(spec, self.info)
        shared, local = split_state(model)
        if source is not None:
            weights = shared_weights_from_checkpoint(source, shared)
        else:
            weights = snapshot["shared_state"]  # type: ignore[index]
        model.load_state_dict(weights, strict=False)
        saved_heads = (snapshot or {}).get("local_state") or {}
        if {k: v.shape for k, v in saved_heads.items()} == {k: v.shape for k, v in local.items()}:
            model.load_state_dict(saved_heads, strict=False)
        model.to(self.device)
        # frozen parameters get no gradient, so Adam leaves them bit-identical
        optimizer = torch.optim.Adam(model.parameters(), lr=lr or preset_lr(model))
        train_set = self.dataset("train")
        count = len(train_set) if cases is None else min(int(cases), len(train_set))
        subset = CaseSubset(train_set, range(count))
        losses: list[float] = []
        run_epochs(
            model,
            optimizer,
            lambda epoch: self.training_loader(epoch, subset),
            self.device,
            epochs,
            HeadsOnly(),
            on_epoch=lambda _, result: losses.append(result["loss"]),
        )
        self.save(
            model,
            server_round=int((snapshot or {}).get("round", 0)),
            run_id=int((snapshot or {}).get("run_id", 0)),
        )
        return {"cases": count, "epochs": epochs, "first_loss": losses[0], "last_loss": losses[-1]}

    def evaluate(self, model: SegmentationModel, split: str = "val") -> dict[str, Any]:
        """The one evaluation on ``split``; the test split averaged over 4 mirrorings of each
        case when the site config sets ``train.test_mirroring: true`` (validation, which
        chooses rounds, never is)."""
        mirror = split == "test" and bool(self.cfg.get("train", {}).get("test_mirroring", False))
        return evaluate(model, self.loader(split, shuffle=False), self.device, mirror=mirror)

    # --- raters -----------------------------------------------------------------------
    @property
    def shares_quality(self) -> bool:
        """Whether the site opted in to send its annotation-quality score each round."""
        return bool(self.cfg.get("share_quality", False))

    def _cases_of(self, split: str) -> Dataset:
        """One split's cases, or every split's (``all``) that holds any."""
        if split != "all":
            if split not in SPLITS:
                raise SiteDataError(f"unknown split {split!r}; choose all or one of {SPLITS}")
            return self.dataset(split)
        parts = []
        for name in SPLITS:
            try:
                parts.append(self.dataset(name))
            except EmptySplitError:
                continue
        return ConcatDataset(parts)

    def assess_raters(
        self, model: SegmentationModel | None = None, split: str = "all"
    ) -> RaterAssessment:
        """Every rater of the site against the calibrated consensus of ``model`` (default: the
        site's own personalised model) on ``split``."""
        model = self.personal_model() if model is None else model
        loader = self.loader(split, shuffle=False)
        return assess_raters(model, loader, self.device, self.cfg["data"].get("classes"))

    def rater_report(self, out_dir: str | Path, split: str = "all") -> list[Path]:
        """Write the site's rater report (``raters.json``, ``raters.md``, PNGs) to ``out_dir``."""
        return write_rater_report(self.assess_raters(split=split), out_dir, self.name, split)

    def annotation_quality(self, model: SegmentationModel) -> float:
        """The bounded score a site that opted in sends: measured on the validation split,
        which the round did not train on (the training split when there is none)."""
        try:
            split = "val" if len(self.dataset("val")) else "train"
        except EmptySplitError:
            split = "train"
        return annotation_quality(model, self.loader(split, shuffle=False), self.device)
