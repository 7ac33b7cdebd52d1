// Starts Swagger UI on the server's own OpenAPI document. A file, not an inline script, so the page
// runs under a Content-Security-Policy that allows only same-origin scripts.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = window.SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // The default validator is a third-party web service: never send our document anywhere.
    validatorUrl: null,
    tryItOutEnabled: false,
  });
});
