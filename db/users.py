"""Console users and login sessions: create, authenticate, open, resolve, close.

Passwords are hashed with scrypt (stdlib). Session tokens are random; the
database keeps only their sha256, so a copy of the database opens no session.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from headscreen.db.engine import begin_write, write_transaction
from headscreen.db.models import User, UserRole, WebSession
from headscreen.db.txn import add_audit, clock, end_read, execute_counted
from headscreen.errors import HeadscreenError, InputRejected

logger = logging.getLogger(__name__)

USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8
# scrypt cost: n=2**14, r=8 takes ~50 ms and 16 MiB, the stdlib default memory cap allows it.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class UserExists(HeadscreenError):
    """A user with that name exists already."""


@dataclass(frozen=True)
class UserInfo:
    user_id: int
    username: str
    role: str
    disabled: bool


@dataclass(frozen=True)
class LoginSession:
    token: str  # the cookie value; shown once, never stored
    csrf_token: str
    expires_at: datetime
    user: UserInfo


@dataclass(frozen=True)
class ActiveSession:
    session_id: int
    csrf_token: str
    expires_at: datetime
    user: UserInfo


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    encode = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encode(salt).decode()}${encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=32)
    except ValueError:
        return False
    return hmac.compare_digest(actual, base64.b64decode(digest))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _info(user: User) -> UserInfo:
    return UserInfo(user.id, user.username, str(user.role), user.disabled)


def create_user(
    session: Session, username: str, password: str, role: str, actor: str, now: datetime | None = None
) -> UserInfo:
    """Add a local user (commits, audited). Raises InputRejected, UserExists."""
    now = clock(now)
    if not USERNAME.match(username):
        raise InputRejected("username: 1-64 letters, digits or _ . @ -")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InputRejected(f"password: at least {MIN_PASSWORD_LENGTH} characters")
    try:
        role_value = UserRole(role)
    except ValueError:
        raise InputRejected(f"role: one of {', '.join(r.value for r in UserRole)}") from None
    password_hash = hash_password(password)  # slow: outside the write transaction
    with write_transaction(session):
        if session.execute(select(User.id).where(User.username == username)).first() is not None:
            raise UserExists(f"user {username!r} exists")
        user = User(username=username, role=role_value, password_hash=password_hash, disabled=False, created_at=now)
        session.add(user)
        session.flush()
        add_audit(session, actor, "user_created", now, None, {"username": username, "role": role_value.value})
    logger.info("user created", extra={"action": "user_created", "username": username, "role": role_value.value})
    return _info(user)


def set_password(session: Session, username: str, password: str, actor: str, now: datetime | None = None) -> None:
    """Replace a user's password and close their sessions (commits, audited)."""
    now = clock(now)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InputRejected(f"password: at least {MIN_PASSWORD_LENGTH} characters")
    password_hash = hash_password(password)
    with write_transaction(session):
        user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
        if user is None:
            raise InputRejected(f"no user {username!r}")
        user.password_hash = password_hash
        session.execute(delete(WebSession).where(WebSession.user_id == user.id))
        add_audit(session, actor, "user_password_set", now, None, {"username": username})


def list_users(session: Session) -> list[UserInfo]:
    users = [_info(u) for u in session.execute(select(User).order_by(User.username)).scalars()]
    end_read(session)
    return users


@functools.lru_cache(maxsize=1)
def _unknown_user_hash() -> str:
    """A stored hash to check unknown names against: one scrypt per attempt, as for a real user
    (hashing a fresh one each time would cost two and tell the names apart by timing)."""
    return hash_password(secrets.token_urlsafe(16))


def login(
    session: Session, username: str, password: str, lifetime: timedelta, now: datetime | None = None
) -> LoginSession | None:
    """Check the password and open a session (commits, audited either way); None when refused."""
    now = clock(now)
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    end_read(session)
    # Hash even for unknown users so timing does not reveal which names exist.
    ok = verify_password(password, user.password_hash if user else _unknown_user_hash())
    begin_write(session)
    try:
        if user is None or not ok or user.disabled:
            add_audit(session, username[:64] or "-", "login_failed", now, None, {})
            session.commit()
            logger.warning("console login refused", extra={"action": "login_failed"})
            return None
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        session.add(WebSession(token_hash=_token_hash(token), user_id=user.id, csrf_token=csrf, created_at=now,
                               expires_at=now + lifetime))
        session.execute(delete(WebSession).where(WebSession.expires_at <= now))
        db_user = session.get(User, user.id)
        assert db_user is not None
        db_user.last_login_at = now
        add_audit(session, user.username, "login", now, None, {})
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return LoginSession(token, csrf, now + lifetime, _info(user))


def resolve_session(session: Session, token: str, now: datetime | None = None) -> ActiveSession | None:
    """The live session for a cookie token (read-only); None when unknown, expired or disabled."""
    now = clock(now)
    found = session.execute(
        select(WebSession, User).join(User, User.id == WebSession.user_id)
        .where(WebSession.token_hash == _token_hash(token), WebSession.expires_at > now)
    ).one_or_none()
    end_read(session)
    if found is None or found[1].disabled:
        return None
    web_session, user = found
    return ActiveSession(web_session.id, web_session.csrf_token, web_session.expires_at, _info(user))


def logout(session: Session, token: str, actor: str, now: datetime | None = None) -> bool:
    """Close a session (commits, audited); False when it did not exist."""
    now = clock(now)
    with write_transaction(session):
        removed = execute_counted(session, delete(WebSession).where(WebSession.token_hash == _token_hash(token)))
        if removed:
            add_audit(session, actor, "logout", now, None, {})
    return removed > 0
