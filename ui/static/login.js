// The login form: posts the credentials as JSON (the server accepts nothing else, so
// another site's form cannot log a browser in) and goes to the page asked for.
const form = document.getElementById('login-form');
const errorBox = document.getElementById('login-error');
const submit = document.getElementById('login-submit');

function showError(text) {
  errorBox.textContent = text;
  errorBox.hidden = false;
}

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  errorBox.hidden = true;
  submit.disabled = true;
  try {
    const resp = await fetch('/login', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      credentials: 'same-origin',
      body: JSON.stringify({
        username: form.username.value,
        password: form.password.value,
      }),
    });
    if (resp.ok) {
      window.location.assign('/');
      return;
    }
    let message = `Login failed (HTTP ${resp.status}).`;
    try {
      const body = await resp.json();
      if (resp.status === 401) message = 'Wrong user name or password.';
      else if (body && body.error) message = body.error.charAt(0).toUpperCase() + body.error.slice(1) + '.';
    } catch (_) { /* not JSON: keep the status */ }
    showError(message);
    form.password.select();
  } catch (e) {
    showError('The controller did not answer: ' + e.message);
  } finally {
    submit.disabled = false;
  }
});
