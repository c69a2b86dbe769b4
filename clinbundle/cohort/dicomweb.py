"""`clinbundle predict --dicomweb URL`: studies from a PACS in, DICOM SEGs back into them.

QIDO-RS finds the studies (all, or the `--study` UIDs), WADO-RS retrieves each into a temp folder
beside the outputs, the cohort runs them as DICOM cases (`dicom_cases.py`: the same series
choice, volume and SEG as `--input`), and STOW-RS stores each SEG into its study. All HTTP goes
through `dicomweb-client` (the maintained DICOMweb client); this module adds what a batch job
against a clinical archive needs around it:

- a PACS that cannot be reached, or refuses the credentials, stops the job before anything runs
  (ClinbundleError: the CLI exits 2); nothing is stored half (each SEG is one STOW request of one
  complete file, sent only after the file is written);
- a study that cannot be retrieved (or is absurdly large: `MAX_STUDY_INSTANCES`,
  `MAX_STUDY_MB`, checked from QIDO's count before and the bytes during retrieval) is a failed
  row, never the end of the job;
- each SEG store is tried `STORE_TRIES` times with exponential backoff and reported per case in
  the column `stored` ("yes", "failed: reason", "" when there is no SEG); a SEG the PACS already
  holds (a re-run: same SOPInstanceUID) is not sent again;
- an optional bearer token (`--dicomweb-token` or CLINBUNDLE_DICOMWEB_TOKEN) goes into the
  session's headers only, never into a log line or an error message.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from clinbundle.runtime.errors import ClinbundleError

if TYPE_CHECKING:
    from clinbundle.cohort.batch import Summary
    from clinbundle.cohort.model import ModelSpec

log = logging.getLogger("clinbundle.cohort")

TOKEN_ENV = "CLINBUNDLE_DICOMWEB_TOKEN"
#: A study with more instances than this is refused before retrieval (CLINBUNDLE_DICOMWEB_MAX_
#: INSTANCES overrides): a whole-body CT with every reconstruction stays well below it.
MAX_STUDY_INSTANCES = int(os.environ.get("CLINBUNDLE_DICOMWEB_MAX_INSTANCES", 0)) or 20000
#: ... and one whose retrieved bytes pass this (CLINBUNDLE_DICOMWEB_MAX_STUDY_MB overrides).
MAX_STUDY_MB = float(os.environ.get("CLINBUNDLE_DICOMWEB_MAX_STUDY_MB", 0)) or 8192.0
STORE_TRIES = 3
STORE_BACKOFF_S = 1.0  # then 2 s: 3 tries within about 3 s plus the requests themselves
TIMEOUT_S = 60.0
STUDY_UID, N_INSTANCES, SOP_UID = "0020000D", "00201208", "00080018"
_UID = re.compile(r"^[0-9.]{1,64}$")


class DicomwebError(ClinbundleError):
    """The PACS cannot be used at all (unreachable, refuses us, answers nonsense)."""


def _reason(e: Exception) -> str:
    """A short reason without request headers (the token) or response bodies."""
    import requests

    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code} {e.response.reason}"
    if isinstance(e, requests.ConnectionError):
        return "connection refused or lost"
    if isinstance(e, requests.Timeout):
        return f"no answer within {TIMEOUT_S:.0f} s"
    return f"{type(e).__name__}: {str(e)[:200]}"


def make_client(url: str, token: str | None = None):
    """A DICOMweb client for `url`; the token, if any, only in the session's headers."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    if not re.match(r"^https?://", url):
        raise DicomwebError(f"--dicomweb {url!r} is not an http(s) URL of a DICOMweb root")
    session = requests.Session()
    token = token or os.environ.get(TOKEN_ENV) or None
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    log.info("DICOMweb %s (%s)", url, "bearer token" if token else "no credentials")
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=TIMEOUT_S)
    # its own retry (5 tries, 30 s of backoff, on any exception) would make a PACS that is down
    # take half a minute per request: stores are retried here (STORE_TRIES), the rest fail fast
    client.set_http_retry_params(retry=False)
    return client


def _value(item: dict, tag: str):
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def find_studies(client, url: str, study_uids: list[str] | None) -> list[tuple[str, int | None]]:
    """QIDO-RS: (StudyInstanceUID, number of instances) of every study or of the ones asked
    for; DicomwebError when the PACS cannot be queried at all, or a UID is not there."""
    bad = [u for u in study_uids or [] if not _UID.match(u)]
    if bad:
        raise DicomwebError(f"--study {bad[0]!r} is not a DICOM UID (digits and dots)")
    filters = [{STUDY_UID: u} for u in study_uids] if study_uids else [{}]
    found: dict[str, int | None] = {}
    for f in filters:
        try:
            items = client.search_for_studies(search_filters=f, get_remaining=True)
        except Exception as e:
            raise DicomwebError(
                f"the PACS at {url} cannot be queried (QIDO-RS): {_reason(e)}"
            ) from None
        for item in items:
            uid = _value(item, STUDY_UID)
            if uid:
                n = _value(item, N_INSTANCES)
                found[str(uid)] = int(n) if n is not None else None
    missing = [u for u in study_uids or [] if u not in found]
    if missing:
        raise DicomwebError(f"the PACS at {url} has no study {', '.join(missing)}")
    if not found:
        raise DicomwebError(f"the PACS at {url} holds no studies")
    log.info("QIDO-RS: %d stud%s", len(found), "y" if len(found) == 1 else "ies")
    return sorted(found.items())


def retrieve_study(client, study_uid: str, n_instances: int | None, folder: Path) -> int:
    """WADO-RS the study into `folder` (one file per instance, named by SOPInstanceUID);
    refuses one that is too large. Returns the number of instances written."""
    if n_instances is not None and n_instances > MAX_STUDY_INSTANCES:
        raise ValueError(
            f"{n_instances} instances, more than the limit of {MAX_STUDY_INSTANCES} "
            "(CLINBUNDLE_DICOMWEB_MAX_INSTANCES)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    total, count = 0, 0
    for ds in client.iter_study(study_uid):
        if str(ds.get("StudyInstanceUID", "")) != study_uid:
            raise ValueError(f"the PACS sent an instance of another study ({ds.StudyInstanceUID})")
        sop = str(ds.SOPInstanceUID)
        name = sop if _UID.match(sop) else f"instance{count}"
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        count += 1
        total += path.stat().st_size
        if total > MAX_STUDY_MB * 2**20 or count > MAX_STUDY_INSTANCES:
            raise ValueError(
                f"more than {MAX_STUDY_MB:.0f} MB or {MAX_STUDY_INSTANCES} instances "
                "(CLINBUNDLE_DICOMWEB_MAX_STUDY_MB / _MAX_INSTANCES)"
            )
    if not count:
        raise ValueError("the PACS returned no instances")
    return count


def _already_stored(client, study_uid: str, sop_uid: str) -> bool:
    hits = client.search_for_instances(
        study_instance_uid=study_uid, search_filters={SOP_UID: sop_uid}
    )
    return any(_value(h, SOP_UID) == sop_uid for h in hits)


def store_seg(
    client, path: Path, tries: int = STORE_TRIES, backoff_s: float = STORE_BACKOFF_S
) -> str:
    """STOW-RS one SEG into its study: "yes", or "failed: reason" after `tries` attempts."""
    from pydicom import dcmread

    ds = dcmread(path)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    reason = ""
    for attempt in range(1, tries + 1):
        try:
            if _already_stored(client, study, sop):
                log.info("SEG %s is already in study %s", sop, study)
                return "yes"
            response = client.store_instances([ds], study_instance_uid=study)
            failed = response.get("FailedSOPSequence") if response is not None else None
            if failed:
                raise ValueError(f"the PACS refused the instance ({len(failed)} failed)")
            log.info("STOW-RS: SEG %s stored into study %s", sop, study)
            return "yes"
        except Exception as e:
            reason = _reason(e)
            log.warning("STOW-RS of %s, try %d of %d: %s", path.name, attempt, tries, reason)
            if attempt < tries:
                time.sleep(backoff_s * 2 ** (attempt - 1))
    return f"failed: {reason} ({tries} tries)"


def fetch(client, studies: list[tuple[str, int | None]], folder: Path) -> list[dict]:
    """Every study (`find_studies`) into `folder/<n>/`; the studies that could not be retrieved
    as failed rows (case_id = study UID, error = why)."""
    failed = []
    for n, (uid, count) in enumerate(studies):
        try:
            got = retrieve_study(client, uid, count, folder / str(n))
            log.info("WADO-RS: study %s, %d instance(s)", uid, got)
        except Exception as e:
            log.warning("study %s not retrieved: %s", uid, _reason(e))
            failed.append({"case_id": uid, "input": uid, "error": f"WADO-RS: {_reason(e)}"})
    return failed


def store_rows(client, rows: list[dict], output_dir: Path) -> None:
    """STOW-RS each done row's SEG; sets its `stored` column."""
    for row in rows:
        seg = row.get("seg") or ""
        if row.get("status") != "done" or not seg:
            row["stored"] = ""
            continue
        row["stored"] = store_seg(client, Path(output_dir) / seg)


def predict_dicomweb(args: argparse.Namespace, spec: ModelSpec) -> tuple[list[dict], Summary]:
    """`clinbundle predict --dicomweb URL [--study UID ...]`: the studies are retrieved into a
    temp folder beside the outputs (same disk; removed after the job), run as DICOM cases, and
    each SEG is stored into its study before the table is written. A study that could not be
    retrieved is a failed row (not in the manifest: the next run tries it again)."""
    from clinbundle.cohort.batch import predict
    from clinbundle.cohort.dicom_cases import dicom_cases
    from clinbundle.cohort.model import model_modality

    url, out = args.dicomweb, Path(args.output)
    client = make_client(url, args.dicomweb_token)
    studies = find_studies(client, url, args.study)  # a PACS that is down: nothing written
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dicomweb-", dir=out) as tmp:
        failed = fetch(client, studies, Path(tmp))
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        cases = dicom_cases(files, Path(tmp), model_modality(spec))

        def finish(rows: list[dict]) -> list[dict]:
            store_rows(client, rows, out)
            return rows + [r | {"status": "failed", "stored": ""} for r in failed]

        return predict(
            cases,
            spec,
            out,
            args.engine,
            args.address,
            args.flag_worst or 0,
            retry_failed=args.retry_failed,
            finish=finish,
        )
