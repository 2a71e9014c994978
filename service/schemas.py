"""Pydantic models of the JSON the API answers with (and of the infer body, for the docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Readiness(BaseModel):
    ready: bool
    error: str | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(default_factory=dict)


class ModelReadiness(BaseModel):
    name: str
    version: str | None = None
    ready: bool


class IndexRequest(BaseModel):
    ready: bool | None = Field(default=None, description="Only models that are (not) ready.")


class IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str
    reason: str | None = None


class LoadResult(BaseModel):
    name: str
    versions: list[str]
    state: str


class InferInputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequestBody(BaseModel):
    """Open Inference Protocol v2 request (JSON form; binary tensors follow the JSON header when
    `Inference-Header-Content-Length` is set)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor]
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutputTensor]


class PredictRequestBody(BaseModel):
    instances: list[Any]


class PredictResponseBody(BaseModel):
    predictions: list[dict[str, Any]]
    model_name: str
    model_version: str
