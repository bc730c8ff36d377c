"""Token routes: revoke the token in use, another token of the caller's, or one of its token ids."""
from __future__ import annotations

from flask import g
from pydantic import Field, model_validator

from core.errors import DomainError, Unauthorized, ValidationFailed
from core.revocations import MAX_JTI_LENGTH
from web.api import api, json_body, revocations
from web.auth import decode_token
from web.context import ctx
from web.schemas import Strict

# Redis refuses expiry times it cannot represent; no token of ours lives past this (2100-01-01).
LATEST_EXP = 4_102_444_800


class RevokeRequest(Strict):
    """Empty: the token presented. `token`: another token of yours. `jti` + `exp`: a token id of yours,
    remembered until `exp` (the token's expiry, Unix seconds)."""
    token: str | None = Field(None, min_length=1, max_length=8192)
    jti: str | None = Field(None, min_length=1, max_length=MAX_JTI_LENGTH)
    exp: int | None = Field(None, ge=1, le=LATEST_EXP)

    @model_validator(mode="after")
    def _one_target(self) -> "RevokeRequest":
        if self.token is not None and self.jti is not None:
            raise ValueError("give token or jti, not both")
        if (self.jti is None) != (self.exp is None):
            raise ValueError("jti and exp go together: exp is when the token expires")
        return self


class NotRevocable(DomainError):
    status = 422
    code = "not_revocable"


@api.post("/tokens/revoke")
def revoke_token():
    """Refuses a token of the caller's from now until it expires (401 `token_revoked`); at most
    CCD_OWNER_REVOCATIONS_PER_HOUR requests an hour (429 `revocation_limit`)."""
    spec = json_body(RevokeRequest)
    settings = ctx().settings
    revocations().admit(g.owner, settings.owner_revocations_per_hour)
    if spec.jti is not None:
        jti, exp = spec.jti, spec.exp
    else:
        claims = g.claims if spec.token is None else other_token(spec.token)
        if claims is None:  # it expired: nothing left to revoke
            return {"jti": None, "exp": None, "revoked": False}, 200
        if "jti" not in claims:
            raise NotRevocable("this token has no jti, so it cannot be revoked alone; mint tokens with "
                               "`ccd token` (they carry one), or change JWT_SECRET to end every token")
        jti, exp = claims["jti"], int(claims["exp"])
    until = revocations().revoke(g.owner, jti, exp, settings.max_token_ttl_seconds)
    return {"jti": jti, "exp": exp, "revoked": until is not None}, 200


def other_token(token: str) -> dict | None:
    """The claims of a token the caller wants revoked (genuine, the caller's own); None once it expired."""
    settings = ctx().settings
    try:
        claims = decode_token(token, settings.jwt_secret, settings.jwt_audience, settings.jwt_issuer,
                              settings.max_token_ttl_seconds)
    except Unauthorized as exc:
        if exc.code == "token_expired":
            return None
        raise ValidationFailed(f"token: {exc.message}", field="token") from None
    if claims["sub"] != g.owner:
        raise ValidationFailed("token: it belongs to another owner; revoke it with one of that owner's tokens",
                               field="token")
    return claims
