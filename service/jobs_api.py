"""`/v1/jobs`: submit, list, poll and cancel batch-scoring jobs (see `service.jobs`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from service.jobs import Job, JobManager, JobSpec
from service.schemas import ErrorBody
from service.security import ANONYMOUS_CALLER, Caller


def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs


def get_caller(request: Request) -> Caller:
    """The caller the security check found (set on the request's state)."""
    return request.scope.get("state", {}).get("caller", ANONYMOUS_CALLER)


JobsDep = Annotated[JobManager, Depends(get_jobs)]
CallerDep = Annotated[Caller, Depends(get_caller)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 503)
}

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)


@router.post("", response_model=Job, status_code=201)
async def submit_job(spec: JobSpec, jobs: JobsDep, caller: CallerDep) -> Job:
    """Queue a job; paths are on the server, inside its jobs root (403 otherwise)."""
    return await jobs.submit(spec, caller)


@router.get("", response_model=list[Job])
def list_jobs(jobs: JobsDep, caller: CallerDep) -> list[Job]:
    """The caller's jobs (an admin key sees every job), oldest first."""
    return jobs.all(caller)


@router.get("/{job_id}", response_model=Job)
def get_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> Job:
    """A job's state (queued, running, succeeded, failed, cancelled) and progress."""
    return jobs.get(job_id, caller)


@router.delete("/{job_id}", response_model=Job)
async def cancel_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> Job:
    """Cancel a queued or running job; committed chunks stay, and resubmitting resumes."""
    return await jobs.cancel(job_id, caller)
