"""Base classes shared by request and response models."""

from pydantic import BaseModel, ConfigDict


class RequestModel(BaseModel):
    """Request bodies forbid unknown fields: a typo is a 422, never a silent default."""

    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)
