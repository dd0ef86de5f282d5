// The REST API, called with the signed-in user's token: the UI has no other way in.
//
// The token lives in sessionStorage (gone when the tab closes) and goes only to this server
// (same origin). Errors come back as ApiError with the server's error_code and message, so a
// view can show them next to the field they name.

const KEY = "sqlinfer.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const session = {
  get token() { return sessionStorage.getItem(KEY); },
  set token(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
  user: null,
};

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.token}`, "Content-Type": "application/json", ...extra };
}

async function failure(response) {
  let body = {};
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  const error = body.error && typeof body.error === "object" ? body.error : body;
  return new ApiError(response.status, error.error_code || error.code || `HTTP_${response.status}`,
    error.message || response.statusText);
}

export async function call(method, path, body) {
  const response = await fetch(path, {
    method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    const error = await failure(response);
    // A token that stopped working (revoked, expired) while signed in: back to the sign-in form.
    if (response.status === 401 && session.user) window.dispatchEvent(new CustomEvent("sqlinfer:signed-out", { detail: error.message }));
    throw error;
  }
  const text = await response.text();
  return text ? JSON.parse(text) : {};
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body ?? {});
export const put = (path, body) => call("PUT", path, body);
export const patch = (path, body) => call("PATCH", path, body);

// Server-sent events of a streamed chat completion: onChunk(parsed) for each `data:` line.
export async function stream(path, body, onChunk, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(500, parsed.error.code || parsed.error.type, parsed.error.message);
        onChunk(parsed);
      }
    }
  }
}

export const enc = encodeURIComponent;
