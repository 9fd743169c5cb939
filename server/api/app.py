"""The FastAPI app: routes, authentication, body parsing and error translation. No generation
logic lives here; the serving classes do the translating and the engine does the work.

The app exists before the engine: while the model loads every /v1 route and /health answer 503,
so the port is open (and the Docker HEALTHCHECK meaningful) from the first second.

Every refusal is a 4xx in OpenAI's error shape; a 500 means a fault of the server, logged with an id
that its message repeats.
"""
import logging
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.admission import Admission
from server.api.engine_client import ModelInfo, scheduler_state
from server.api.errors import APIError, validation_error
from server.api.limits import RequestLimits, read_json
from server.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, random_id
from server.api.serving_chat import OpenAIServingChat
from server.api.serving_completion import OpenAIServingCompletion
from server.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)


def offramp_version() -> str:
    try:
        return version("offramp")
    except PackageNotFoundError:
        return "0+unknown"


class ServerState:
    """What the routes reach: None-valued until the engine is ready."""

    def __init__(self, api_key: str | None = None, max_waiting: int | None = None,
                 limits: RequestLimits | None = None):
        self.api_key = api_key
        self.admission = Admission(max_waiting)
        self.limits = limits or RequestLimits()
        self.engine = None
        self.info: ModelInfo | None = None
        self.metrics: Metrics | None = None
        self.completion: OpenAIServingCompletion | None = None
        self.chat: OpenAIServingChat | None = None

    def set_engine(self, engine, info: ModelInfo, metrics: Metrics | None) -> None:
        self.info = info
        self.metrics = metrics
        self.completion = OpenAIServingCompletion(engine, info, self.admission, self.limits)
        self.chat = OpenAIServingChat(engine, info, self.admission, self.limits)
        self.engine = engine

    def health_problem(self) -> str | None:
        """None when the engine runs, else why not."""
        if self.engine is None:
            return "the model is loading"
        try:
            self.engine.check_health()
        except Exception as err:
            return f"the engine has stopped: {err}"
        return None

    def ready(self) -> None:
        problem = self.health_problem()
        if problem is not None:
            raise APIError(503, problem, code="unavailable")


async def parse_body(request: Request, model: type[BaseModel], limits: RequestLimits):
    data = await read_json(request, limits)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def respond(result) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Offramp", version=offramp_version(), docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        # Starlette re-raises after this answers, and uvicorn logs the traceback next to this line
        error_id = random_id("error")
        log.error("%s: internal error in %s %s: %r", error_id, request.method, request.url.path, err)
        return APIError(500, f"internal error ({type(err).__name__}); error id {error_id}",
                        code="internal_error").response()

    def check_api_key(request: Request) -> None:
        if state.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1")

    @v1.post("/completions")
    async def completions(request: Request):
        check_api_key(request)
        state.ready()
        body = await parse_body(request, CompletionRequest, state.limits)
        return respond(await state.completion.create_completion(body, request))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request)
        state.ready()
        body = await parse_body(request, ChatCompletionRequest, state.limits)
        return respond(await state.chat.create_chat_completion(body, request))

    @v1.get("/models")
    async def models(request: Request):
        check_api_key(request)
        state.ready()
        info = state.info
        card = ModelCard(id=info.name, max_model_len=info.max_model_len, exit_layers=info.exit_layers,
                         exit_epsilons=info.epsilons, default_exit_epsilon=info.default_epsilon)
        return ModelList(data=[card]).model_dump(mode="json")

    app.include_router(v1)

    @app.get("/health")
    async def health():
        problem = state.health_problem()
        if problem is not None:
            return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def get_version():
        return {"version": offramp_version()}

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response(b"", media_type=CONTENT_TYPE)
        state.metrics.set_scheduler_state(*scheduler_state(state.engine))
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    return app
