"""`/v1/jobs`: submit, list, poll and cancel batch-scoring jobs (see `service.jobs`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from service.jobs import Job, JobManager, JobSpec
from service.schemas import ErrorBody


def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs


JobsDep = Annotated[JobManager, Depends(get_jobs)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 403, 404, 409, 503)
}

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)


@router.post("", response_model=Job, status_code=201)
async def submit_job(spec: JobSpec, jobs: JobsDep) -> Job:
    """Queue a job; paths are on the server, inside its jobs root (403 otherwise)."""
    return await jobs.submit(spec)


@router.get("", response_model=list[Job])
def list_jobs(jobs: JobsDep) -> list[Job]:
    """Every job, oldest first."""
    return jobs.all()


@router.get("/{job_id}", response_model=Job)
def get_job(job_id: str, jobs: JobsDep) -> Job:
    """A job's state (queued, running, succeeded, failed, cancelled) and progress."""
    return jobs.get(job_id)


@router.delete("/{job_id}", response_model=Job)
async def cancel_job(job_id: str, jobs: JobsDep) -> Job:
    """Cancel a queued or running job; committed chunks stay, and resubmitting resumes."""
    return await jobs.cancel(job_id)
