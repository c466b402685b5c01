"""Settings: one TOML file plus HEADSCREEN_* environment overrides, validated once.

Values from the environment win over the file, so a container or a systemd
drop-in can change one key without editing the file. Nested keys use a double
underscore (HEADSCREEN_DELIVERY__MAX_ATTEMPTS=5); lists are given as JSON
(HEADSCREEN_DESTINATIONS='[{"name": "pacs", ...}]').
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import ssl
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from headscreen.db.txn import DEFAULT_JOB_MAX_ATTEMPTS
from headscreen.db.types import RetryPolicy
from headscreen.errors import ConfigError
from headscreen.privacy import redact_authorization, redact_secrets, redact_url

CONFIG_ENV = "HEADSCREEN_CONFIG"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("must be 1-16 printable characters without backslash")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllowedCaller(_Section):
    """A peer allowed to open associations; host None means any address."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("host")
    @classmethod
    def _valid_host(cls, host: str | None) -> str | None:
        if host is not None:
            ipaddress.ip_address(host)  # raises ValueError naming the bad address
        return host


def _readable_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist or is not a file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {path} is not readable by this user: {exc.strerror}") from None


def _no_passphrase() -> bytes:
    raise ValueError("the private key is encrypted; use an unencrypted key readable only by the service user")


def _check_tls_files(cert: Path | None, key: Path | None, ca: Path | None) -> None:
    """Load what TLS will load, so a bad file stops start-up naming the file, not the first association."""
    if (cert is None) != (key is None):
        raise ValueError("cert and key must be given together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert is not None and key is not None:
        _readable_file(cert, "cert")
        _readable_file(key, "key")
        try:
            # No passphrase: OpenSSL would otherwise prompt on the terminal and hang start-up.
            context.load_cert_chain(str(cert), str(key), password=_no_passphrase)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"cert {cert} / key {key}: not a PEM certificate and its matching "
                             f"unencrypted private key ({exc})") from None
    if ca is not None:
        _readable_file(ca, "ca")
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as exc:
            raise ValueError(f"ca {ca}: not PEM CA certificates ({exc})") from None


class CallerCertificate(_Section):
    """A client certificate (by subject CN) allowed to call as one AE title over TLS."""

    ae_title: str
    subject_cn: str = Field(min_length=1, max_length=64)

    _ae = field_validator("ae_title")(_check_ae_title)


class ReceiverTlsConfig(_Section):
    """DICOM over TLS on its own port (the plain port stays unless plain_dicom = false)."""

    enabled: bool = False
    port: int = Field(2762, ge=0, le=65535)  # 2762: the registered DICOM-TLS port
    cert: Path | None = None
    key: Path | None = None
    # CA certificates that sign client certificates; without one, none is asked for.
    ca: Path | None = None
    require_client_cert: bool = False
    caller_certificates: list[CallerCertificate] = []

    @model_validator(mode="after")
    def _usable(self) -> ReceiverTlsConfig:
        if not self.enabled:
            return self
        if self.cert is None or self.key is None:
            raise ValueError("TLS is enabled: set cert and key (PEM files)")
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs ca (the CA that signs client certificates)")
        if self.caller_certificates and not self.require_client_cert:
            raise ValueError("caller_certificates needs require_client_cert = true")
        _check_tls_files(self.cert, self.key, self.ca)
        return self


# Past a few processes ingest is bound by the disk and the network, not by Python.
AUTO_RECEIVER_PROCESSES_MAX = 4


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container's cpuset sets)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


class ReceiverSection(_Section):
    """Receiver limits and security; ae_title, port and the allow-list are top-level keys."""

    plain_dicom: bool = True  # false: no plain listener, [receiver.tls] only
    check_called_ae_title: bool = False
    association_request_timeout_s: float = Field(10.0, gt=0, le=600)
    network_timeout_s: float = Field(60.0, gt=0)
    max_associations: int = Field(16, ge=1, le=1000)
    max_connections_per_address: int = Field(8, ge=1, le=1000)
    max_idle_connections: int = Field(32, ge=1, le=10_000)
    refusal_log_interval_s: float = Field(60.0, gt=0)
    # Receiver processes accepting on the port (daemon/receiver_pool.py): one is bound to
    # about one core; more let concurrent associations use the others. "auto": one per
    # core this process may run on, at most AUTO_RECEIVER_PROCESSES_MAX.
    processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    tls: ReceiverTlsConfig = ReceiverTlsConfig()

    def process_count(self) -> int:
        if self.processes != "auto":
            return self.processes
        return max(1, min(usable_cores(), AUTO_RECEIVER_PROCESSES_MAX))

    @model_validator(mode="after")
    def _listens(self) -> ReceiverSection:
        if not self.plain_dicom and not self.tls.enabled:
            raise ValueError("plain_dicom = false needs [receiver.tls] enabled = true: nothing would listen")
        return self


class DestinationTlsConfig(_Section):
    """DICOM TLS to a C-STORE destination; the peer's certificate is always verified."""

    # CA certificates that sign the peer's certificate; unset: the system's trust store.
    ca: Path | None = None
    # Our client certificate, for a peer that asks for one.
    cert: Path | None = None
    key: Path | None = None
    # The name the peer's certificate must carry; unset: the destination's host.
    server_name: str | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _usable(self) -> DestinationTlsConfig:
        _check_tls_files(self.cert, self.key, self.ca)
        return self


class DestinationConfig(_Section):
    """A node that receives our results: a C-STORE SCP ("dimse") or a DICOMweb STOW-RS endpoint ("stow")."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["dimse", "stow"] = "dimse"
    # IHE IOCM: when a new result supersedes one sent here, also send a rejection note (KOS
    # listing the old instances) so the PACS hides them. On by default: a stale result left
    # in view is the greater risk (docs/conformance.md, "Rejection notes").
    iocm_rejection: bool = True
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    # STOW-RS: the studies endpoint, e.g. https://pacs/dicom-web/studies
    url: str | None = None
    # STOW-RS: an HTTP Authorization header value ("Basic ...", "Bearer ..."), if the endpoint needs one.
    authorization: str | None = None
    # DIMSE: associate over TLS (a table: ca, cert, key, server_name, check_hostname).
    tls: DestinationTlsConfig | None = None

    @field_validator("ae_title")
    @classmethod
    def _valid_ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    def redacted(self) -> dict[str, Any]:
        """As JSON-able data with the credentials shown as *** (an unset one stays empty)."""
        data = self.model_dump(mode="json")
        data["authorization"] = redact_authorization(self.authorization)
        data["url"] = None if self.url is None else redact_url(self.url)
        return data

    def __repr_args__(self):
        # repr() ends up in tracebacks and log lines; it must not carry the token.
        redacted = self.redacted()
        for key, value in super().__repr_args__():
            yield key, redacted.get(key, value) if key in ("authorization", "url") else value

    @model_validator(mode="after")
    def _complete_for_kind(self) -> DestinationConfig:
        if self.kind == "dimse" and (self.ae_title is None or self.host is None or self.port is None):
            raise ValueError(f"destination {self.name!r}: kind 'dimse' needs ae_title, host and port")
        if self.kind == "stow" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError(f"destination {self.name!r}: kind 'stow' needs url = 'http(s)://.../studies'")
        if self.kind == "stow" and self.tls is not None:
            raise ValueError(f"destination {self.name!r}: tls is for kind 'dimse'; STOW-RS uses an https:// url")
        return self


class DeliveryConfig(_Section):
    # The retry policy's own defaults (db.types.RetryPolicy), set in one place.
    max_attempts: int = Field(RetryPolicy.max_attempts, ge=1)
    base_delay_s: float = Field(RetryPolicy.base_delay_s, gt=0)
    max_delay_s: float = Field(RetryPolicy.max_delay_s, gt=0)
    timeout_s: float = Field(30.0, gt=0)


class WebConfig(_Section):
    """The admin console (pages, REST API, /healthz, /metrics)."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    session_hours: float = Field(8.0, gt=0, le=24 * 30)
    # Cookies are Secure whenever a request came over HTTPS (directly, or through a trusted
    # proxy's X-Forwarded-Proto); true forces Secure for a proxy that does not say so.
    secure_cookies: bool = False
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks):
    # the client address throttles log-ins, the scheme makes cookies Secure.
    trusted_proxies: list[str] = ["127.0.0.1", "::1"]
    # Log-in throttling: this many failures within login_window_s lock the account (or the
    # client address) for login_lockout_s, doubling with each further lockout up to
    # login_lockout_max_s; a locked attempt is refused (429) before any password hashing.
    login_max_failures: int = Field(5, ge=1, le=1000)
    login_max_failures_per_address: int = Field(30, ge=1, le=100_000)
    login_window_s: float = Field(900.0, gt=0)
    login_lockout_s: float = Field(60.0, gt=0)
    login_lockout_max_s: float = Field(3600.0, gt=0)

    @field_validator("bind_address")
    @classmethod
    def _valid_bind(cls, address: str) -> str:
        ipaddress.ip_address(address)
        return address

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_proxies(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            ipaddress.ip_network(proxy, strict=False)  # "*" is refused: anyone could then pick their address
        return proxies

    @model_validator(mode="after")
    def _lockout_order(self) -> WebConfig:
        if self.login_lockout_max_s < self.login_lockout_s:
            raise ValueError("login_lockout_max_s must be at least login_lockout_s")
        return self


class CalibrationConfig(_Section):
    """Which healthy reference judges a score (daemon.reference; `headscreen calibrate`)."""

    # "bundle": the bundle's own reference (synthetic phantoms). "site": a reference
    # estimated from this scanner's own studies; a scanner without one is "calibrating".
    mode: Literal["bundle", "site"] = "bundle"
    # A site reference is used only with at least this many healthy studies.
    min_references: int = Field(20, ge=1, le=100_000)
    # Scanners that share a reference: one per station, or one per manufacturer + model.
    grouping: Literal["station", "model"] = "station"
    # `calibrate --first N`: scores above median + outlier_mads x 1.4826 x MAD are dropped.
    outlier_mads: float = Field(3.0, gt=0)
    # A scanner's brain-age bias is corrected only from this many confirmed-normal studies
    # with both ages (and only where its 95 % interval excludes 0).
    age_min_studies: int = Field(20, ge=2, le=100_000)


class Settings(BaseSettings):
    """Everything the daemon needs, validated at start-up and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="HEADSCREEN_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    environment: Literal["production", "development"] = "production"
    ae_title: str = "HEADSCREEN"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    allowed_callers: list[AllowedCaller] = []
    allow_any_caller: bool = False
    receiver: ReceiverSection = ReceiverSection()
    storage_dir: Path = Path("/var/lib/headscreen")
    database_url: str = ""
    # Instance and result bytes: files below storage_dir, or rows of the PostgreSQL
    # database (daemon/blobstore.py), which every worker machine reaches.
    storage_backend: Literal["filesystem", "postgresql"] = "filesystem"
    quiet_period_s: float = Field(60.0, gt=0)
    whole_quiet_s: float = Field(5.0, ge=0)
    # ...or this long once every association that sent it was released (None: not used).
    released_quiet_s: float | None = Field(1.0, ge=0)
    bundles: list[Path] = []
    destinations: list[DestinationConfig] = []
    workers: int = Field(1, ge=0, le=64)
    disk_min_free_mb: int = Field(2048, ge=0)
    lease_s: float = Field(120.0, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    sweep_interval_s: float = Field(1.0, gt=0)
    job_max_attempts: int = Field(DEFAULT_JOB_MAX_ATTEMPTS, ge=1)  # the queue's own default (db.txn)
    retention_days: float = Field(30.0, ge=0)
    overlay_slices: int = Field(24, ge=0)
    seg_enabled: bool = True
    # Error-map units (multiples of the healthy 99th percentile) at or above which a voxel is in the SEG.
    # None: each bundle's own, calibrated on healthy scans (1.0 for a bundle without one).
    seg_threshold: float | None = Field(None, gt=0)
    # The anomaly map itself as a DICOM Parametric Map (float32, on the source geometry), for
    # viewers that show one; off by default (a float map of a thin-slice CT is large).
    parametric_map_enabled: bool = False
    # Series selection rules per modality; each key given replaces the default's.
    selection: dict[Literal["CT", "MR"], dict[str, Any]] = {}
    delivery: DeliveryConfig = DeliveryConfig()
    web: WebConfig = WebConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("bind_address")
    @classmethod
    def _valid_bind(cls, address: str) -> str:
        ipaddress.ip_address(address)
        return address

    @model_validator(mode="after")
    def _derived_and_consistent(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.storage_dir / 'headscreen.db'}"
        if not self.database_url.startswith(("sqlite:///", "postgresql")):
            raise ValueError("database_url must be sqlite:///PATH or postgresql+psycopg://...")
        if self.storage_backend == "postgresql" and not self.database_url.startswith("postgresql"):
            raise ValueError('storage_backend = "postgresql" stores the bytes in the database: '
                             "set database_url to a PostgreSQL URL (postgresql+psycopg://...)")
        if not self.bundles:
            self.bundles = shipped_bundles()
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("heartbeat_s must be shorter than lease_s")
        for modality in self.selection:
            self.selection_rules(modality)  # a bad rule stops start-up, naming the key
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        if not self.allowed_callers and not self.allow_any_caller:
            raise ValueError("allowed_callers is empty: list the PACS AE titles, or set allow_any_caller = true")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init values are the TOML file's; the environment overrides them.
        return (env_settings, init_settings)

    def selection_rules(self, modality: str):
        """The declarative series-selection rules for a modality (defaults + overrides)."""
        from headscreen.imaging.selection import Preference, SelectionRules

        default = SelectionRules.default_for(modality)
        override = self.selection.get(modality)  # type: ignore[call-overload]
        if not override:
            return default
        # SelectionRules ignores keys it does not know; a key written below [selection.CT]
        # that was meant for the top level would vanish without this.
        _reject_unknown(override, set(SelectionRules.model_fields) - {"modality"}, f"selection.{modality}")
        preference_fields = set(Preference.model_fields)
        for i, preference in enumerate(override.get("preferences") or []):
            if isinstance(preference, dict):
                _reject_unknown(preference, preference_fields, f"selection.{modality}.preferences[{i}]")
        try:
            return SelectionRules.model_validate({**default.model_dump(), **override})
        except ValidationError as exc:
            raise ValueError(f"selection.{modality}: {exc}") from None

    @property
    def results_dir(self) -> Path:
        return self.storage_dir / "results"

    def redacted(self) -> dict[str, Any]:
        """The effective settings as JSON-able data for printing and logging: the database
        password and the destinations' credentials shown as *** (so one sees they are set)."""
        data = self.model_dump(mode="json")
        data["database_url"] = redact_url(self.database_url)
        data["destinations"] = [d.redacted() for d in self.destinations]
        return data

    def __repr_args__(self):
        for key, value in super().__repr_args__():
            yield key, redact_url(value) if key == "database_url" and isinstance(value, str) else value


def shipped_bundles() -> list[Path]:
    """The default bundles: those in the source tree's models/ folder (a checkout or an
    editable install), else the serving copies packaged in the wheel (headscreen.models,
    installed as site-packages/headscreen/models/<bundle>/)."""
    for root in default_bundle_roots():
        found = sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []
        if found:
            return found
    return []


def default_bundle_roots() -> list[Path]:
    """Where `shipped_bundles` looks, in order (named when serve finds no bundle)."""
    roots = [Path(__file__).resolve().parent.parent / "models"]
    try:
        spec = importlib.util.find_spec("headscreen.models")
    except ImportError:  # no headscreen package at all
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations if Path(p).resolve() != roots[0]]
    return roots


def load_settings(path: Path | None = None, **overrides: object) -> Settings:
    """Read the TOML file (argument, else $HEADSCREEN_CONFIG), apply env, validate."""
    path = path or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(redact_secrets(f"{path}: not valid TOML: {exc}")) from None
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        # A validator's message may quote what it rejected; the secrets given must not reach the terminal.
        given = _secrets_in(data) + _secrets_in(_environment_values())
        raise ConfigError(redact_secrets(_describe(exc, path), given)) from None


def _environment_values() -> list[object]:
    values: list[object] = []
    for key, text in os.environ.items():
        if key.startswith("HEADSCREEN_"):
            try:
                values.append(json.loads(text))  # lists come as JSON
            except ValueError:
                values.append(text)
    return values


def _secrets_in(value: object) -> list[str]:
    """The credentials in raw configuration data: URL passwords and Authorization values."""
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            if key == "authorization" and isinstance(item, str):
                found += [item, item.partition(" ")[2]]
            else:
                found += _secrets_in(item)
        return found
    if isinstance(value, list):
        return [secret for item in value for secret in _secrets_in(item)]
    if isinstance(value, str) and "://" in value:
        try:
            password = urlsplit(value).password
        except ValueError:
            return []
        return [password] if password else []
    return []


def _reject_unknown(given: dict[str, Any], known: set[str], section: str) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {_table(section)}{_top_level_hint(unknown[0], section)}; "
                         f"known keys: {', '.join(sorted(known))}")


def _table(section: str) -> str:
    """How the section reads in the file: [calibration], [selection.CT]; destinations[0] is an inline table."""
    return section if "[" in section else f"[{section}]"


def _top_level_hint(key: str, section: str) -> str:
    if key not in Settings.model_fields:
        return ""
    return (f" ({key} is a top-level key: TOML puts every key written after a [table] header "
            "into that table, so write top-level keys above the first table)")


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            section = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[:-1]).lstrip(".")
            message = (f"unknown key {loc[-1]!r} in {_table(section)}{_top_level_hint(loc[-1], section)}" if section
                       else f"unknown key {loc[-1]!r} (not a setting)")
        elif error["type"] == "value_error" and "error" in error.get("ctx", {}):
            message = str(error["ctx"]["error"])  # our validators' words, without "Value error, "
        lines.append(f"  {'.'.join(loc)}: {message}" if loc else f"  {message}")
    return "\n".join(lines)


def example_toml() -> str:
    """The complete commented example printed by `headscreen config example`."""
    return resources.files("headscreen.daemon").joinpath("config_example.toml").read_text()
